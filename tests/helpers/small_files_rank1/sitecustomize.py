"""Test-only: on rank 1 alone, checkpoint writes fail as on a full disk (a real EFBIG from the kernel:
RLIMIT_FSIZE, which Python answers by raising since it ignores SIGXFSZ). Only DeepSpeed's own
save_checkpoint runs under the limit, so the rank's logs and everything else keep working."""
import os

if os.environ.get("RANK") == "1" and os.environ.get("SFT_LAUNCHED") == "1":
    import resource

    import launcher.engines.deepspeed as _deepspeed

    _save = _deepspeed.DeepSpeedEngine.save_checkpoint

    def _save_on_a_full_disk(self, path):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        try:
            return _save(self, path)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    _deepspeed.DeepSpeedEngine.save_checkpoint = _save_on_a_full_disk
