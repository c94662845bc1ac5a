"""User-facing errors: the CLI prints these as one paragraph, without a traceback."""


class UserError(Exception):
    """A mistake in the user's recipe, data, model or run directory, with how to fix it."""


class RecipeError(UserError):
    pass


class DataError(UserError):
    pass
