"""A bad-input corpus: every case exits 2 with a short message naming the key, file or row; no traceback.

Cases run `sft plan` / `run` / `submit` / `export` in-process (launcher.cli.main) with captured output:
a process per case would cost seconds of imports each. Placeholders: {d} the data dir, {r} the good recipe.
"""

import json

import pytest

from launcher.cli import main

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def _jsonl(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


# file name -> content (str or bytes)
FILES = {
    "ok.jsonl": _jsonl(ROW),
    "empty.jsonl": "",
    "blank.jsonl": "\n\n\n",
    "notjson.jsonl": _jsonl(ROW) + "{not json\n",
    "cut.jsonl": _jsonl(ROW) + '{"messages": [{"role": "user", "con',
    "latin1.jsonl": b'{"text": "caf\xe9"}\n',
    "m_missing.jsonl": _jsonl(ROW, {"conversation": []}),
    "m_notlist.jsonl": _jsonl({"messages": "hello"}),
    "m_emptylist.jsonl": _jsonl({"messages": []}),
    "m_norole.jsonl": _jsonl({"messages": [{"content": "hi"}]}),
    "m_badrole.jsonl": _jsonl(_msgs(("user", "hi"), ("bot", "yo"))),
    "m_latesystem.jsonl": _jsonl(_msgs(("user", "hi"), ("system", "s"), ("assistant", "yo"))),
    "m_noassistant.jsonl": _jsonl(_msgs(("user", "hi"))),
    "m_assistantfirst.jsonl": _jsonl(_msgs(("assistant", "yo"), ("user", "hi"), ("assistant", "yo"))),
    "m_contentint.jsonl": _jsonl({"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "yo"}]}),
    "m_contentempty.jsonl": _jsonl(_msgs(("user", "  "), ("assistant", "yo"))),
    "m_rowlist.jsonl": _jsonl([1, 2]),
    "m_third.jsonl": _jsonl(ROW, ROW, _msgs(("user", "hi"))),
    "a_noinstruction.jsonl": _jsonl({"output": "x"}),
    "a_emptyoutput.jsonl": _jsonl({"instruction": "x", "output": ""}),
    "a_inputint.jsonl": _jsonl({"instruction": "x", "input": 3, "output": "y"}),
    "a_instructionint.jsonl": _jsonl({"instruction": 5, "output": "y"}),
    "c_nocompletion.jsonl": _jsonl({"prompt": "x"}),
    "c_promptint.jsonl": _jsonl({"prompt": 1, "completion": "y"}),
    "c_emptycompletion.jsonl": _jsonl({"prompt": "x", "completion": ""}),
    "t_missing.jsonl": _jsonl({"body": "x"}),
    "t_null.jsonl": _jsonl({"text": None}),
    "t_number.jsonl": _jsonl({"text": 3.5}),
    "header.csv": "text\n",
    "onecol.csv": "body\nhello\n",
    "latin1.csv": b"text\ncaf\xe9\n",
    "empty.csv": "",
    "bad.parquet": "this is not parquet",
    "data.txt": "hello\n",
    "long.jsonl": _jsonl({"text": "hello world " * 1200}),
    "huge_line.jsonl": _jsonl({"text": "word " * 200_000}),
    "evalbad.jsonl": _jsonl(_msgs(("user", "hi"))),
}

RECIPE = "model:\n  path: builtin:tiny-llama\ndata:\n  train_files: [{d}/ok.jsonl]\n  max_seq_len: 64\ntrain:\n  max_steps: 2\n"
RECIPES = {
    "list.yaml": "- a\n- b\n",
    "syntax.yaml": "model:\n  path: x\n   oops: [\n",
    "nomodel.yaml": "data:\n  train_files: [x.jsonl]\n",
    "ext_missing.yaml": "extends: base/nothere.yaml\n",
    "ext_int.yaml": "extends: 5\n",
    "loop_a.yaml": "extends: loop_b.yaml\n",
    "loop_b.yaml": "extends: loop_a.yaml\n",
    "typo.yaml": "extends: r.yaml\ntrian:\n  lr: 1\n",
}


def _data(name, fmt=None):
    return [f"data.train_files=[{{d}}/{name}]"] + ([f"data.format={fmt}"] if fmt else [])


# (id, argv, what the message must name)
CASES = [
    # recipe files
    ("missing recipe", ["plan", "{d}/nope.yaml"], "nope.yaml does not exist"),
    ("recipe is a list", ["plan", "{d}/list.yaml"], "list.yaml: a recipe must be a YAML mapping"),
    ("yaml syntax", ["plan", "{d}/syntax.yaml"], "syntax.yaml: YAML syntax error at line 3"),
    ("required key", ["plan", "{d}/nomodel.yaml"], "model.path"),
    ("extends missing", ["plan", "{d}/ext_missing.yaml"], "`extends: base/nothere.yaml`"),
    ("extends not a string", ["plan", "{d}/ext_int.yaml"], "`extends` must be the path"),
    ("extends loop", ["plan", "{d}/loop_a.yaml"], "`extends:` loop"),
    ("typo in file", ["plan", "{d}/typo.yaml"], "unknown key `trian`"),
    # keys and types
    ("unknown top key", ["plan", "{r}", "trian.lr=1"], "unknown key `trian`"),
    ("unknown nested key", ["plan", "{r}", "train.lrr=1"], "Did you mean `train.lr`"),
    ("wrong type int", ["plan", "{r}", "train.max_steps=many"], "`train.max_steps`"),
    ("wrong type bool", ["plan", "{r}", "data.shuffle=maybe"], "`data.shuffle`"),
    ("wrong type list", ["plan", "{r}", "data.train_files=5"], "data.train_files"),
    ("section as value", ["plan", "{r}", "train=3"], "train"),
    # ranges
    ("lr negative", ["plan", "{r}", "train.lr=-0.1"], "`train.lr` must be > 0"),
    ("lr zero", ["plan", "{r}", "train.lr=0"], "`train.lr` must be > 0"),
    ("lr nan", ["plan", "{r}", "train.lr=nan"], "`train.lr: nan` is not a finite number"),
    ("lr inf", ["plan", "{r}", "train.lr=1e999"], "`train.lr: inf`"),
    ("beta1 one", ["plan", "{r}", "train.adam_beta1=1.0"], "`train.adam_beta1` must be in [0, 1)"),
    ("beta2 negative", ["plan", "{r}", "train.adam_beta2=-0.1"], "`train.adam_beta2`"),
    ("eps zero", ["plan", "{r}", "train.adam_eps=0"], "`train.adam_eps` must be > 0"),
    ("weight decay negative", ["plan", "{r}", "train.weight_decay=-1"], "`train.weight_decay`"),
    ("grad norm negative", ["plan", "{r}", "train.max_grad_norm=-1"], "`train.max_grad_norm`"),
    ("warmup steps negative", ["plan", "{r}", "train.warmup_steps=-5"], "`train.warmup_steps`"),
    ("warmup ratio", ["plan", "{r}", "train.warmup_ratio=1.5"], "`train.warmup_ratio`"),
    ("epochs negative", ["plan", "{r}", "train.epochs=-1"], "`train.epochs`"),
    ("no step", ["plan", "{r}", "train.epochs=0", "train.max_steps=-1"], "`train.epochs` > 0 or `train.max_steps` > 0"),
    ("eval_every negative", ["plan", "{r}", "train.eval_every=-1"], "`train.eval_every`"),
    ("eval_generate negative", ["plan", "{r}", "train.eval_generate=-2"], "`train.eval_generate`"),
    ("eval without data", ["plan", "{r}", "train.eval_every=1"], "need eval data"),
    ("micro batch zero", ["plan", "{r}", "train.micro_batch_size=0"], "`train.micro_batch_size`"),
    ("micro batch huge", ["plan", "{r}", "train.micro_batch_size=99999999999999999999999"], "train.micro_batch_size"),
    ("accumulation zero", ["plan", "{r}", "train.gradient_accumulation_steps=0"], "`train.gradient_accumulation_steps`"),
    ("global batch zero", ["plan", "{r}", "train.global_batch_size=0"], "`train.global_batch_size`"),
    ("both batch keys", ["plan", "{r}", "train.gradient_accumulation_steps=2", "train.global_batch_size=8"], "only one of"),
    ("global batch not multiple", ["plan", "{r}", "train.global_batch_size=3", "--nproc", "2"], "train.global_batch_size=3"),
    ("scheduler", ["plan", "{r}", "train.lr_scheduler=cosin"], "`train.lr_scheduler: cosin`"),
    ("max_seq_len zero", ["plan", "{r}", "data.max_seq_len=0"], "`data.max_seq_len`"),
    ("eval fraction one", ["plan", "{r}", "data.eval_fraction=1.0"], "`data.eval_fraction`"),
    ("eval files and fraction", ["plan", "{r}", "data.eval_files=[{d}/ok.jsonl]", "data.eval_fraction=0.1"], "`data.eval_files` or `data.eval_fraction`"),
    ("format", ["plan", "{r}", "data.format=chat"], "`data.format: chat`"),
    ("too_long", ["plan", "{r}", "data.too_long=cut"], "`data.too_long: cut`"),
    ("model dtype", ["plan", "{r}", "model.dtype=fp8"], "`model.dtype: fp8`"),
    ("fp16 without deepspeed", ["plan", "{r}", "model.dtype=float16"], "`model.dtype: float16`"),
    ("backend", ["plan", "{r}", "strategy.backend=horovod"], "`strategy.backend: horovod`"),
    ("zero stage", ["plan", "{r}", "strategy.zero_stage=5"], "`strategy.zero_stage: 5`"),
    ("offload params stage 2", ["plan", "{r}", "strategy.backend=deepspeed", "strategy.offload_params=true"], "`strategy.offload_params: true`"),
    ("lora r zero", ["plan", "{r}", "lora.enabled=true", "lora.r=0"], "`lora`: r must be >= 1"),
    ("lora dropout one", ["plan", "{r}", "lora.enabled=true", "lora.dropout=1.0"], "dropout"),
    ("lora targets empty", ["plan", "{r}", "lora.enabled=true", "lora.target_modules=[]"], "`lora.target_modules` is empty"),
    ("lora unknown module", ["plan", "{r}", "lora.enabled=true", "lora.target_modules=[nope_proj]"], "nope_proj"),
    ("keep_last zero", ["plan", "{r}", "checkpoint.keep_last=0"], "`checkpoint.keep_last`"),
    ("every_steps negative", ["plan", "{r}", "checkpoint.every_steps=-1"], "`checkpoint.every_steps`"),
    ("grace zero", ["plan", "{r}", "checkpoint.signal_grace_s=0"], "`checkpoint.signal_grace_s`"),
    ("resume empty", ["plan", "{r}", "checkpoint.resume=' '"], "`checkpoint.resume` is empty"),
    ("export dtype", ["plan", "{r}", "export.dtype=int8"], "`export.dtype: int8`"),
    ("shard size", ["plan", "{r}", "export.max_shard_size=big"], "`export.max_shard_size: big`"),
    ("verify prompts zero", ["plan", "{r}", "export.verify_prompts=0"], "`export.verify_prompts`"),
    ("nproc zero", ["plan", "{r}", "--nproc", "0"], "`launch.nproc_per_node`"),
    ("node rank out of range", ["plan", "{r}", "--nnodes", "2", "--node-rank", "3"], "`launch.node_rank`"),
    ("collective timeout zero", ["plan", "{r}", "launch.collective_timeout_s=0"], "`launch.collective_timeout_s`"),
    ("max restarts negative", ["plan", "{r}", "launch.max_restarts=-1"], "`launch.max_restarts`"),
    ("slurm nodes zero", ["plan", "{r}", "slurm.nodes=0"], "`slurm.nodes` must be at least 1"),
    ("submit slurm nodes zero", ["submit", "{r}", "slurm.nodes=0", "--dry-run"], "`slurm.nodes` must be at least 1"),
    ("slurm gpus negative", ["plan", "{r}", "slurm.gpus_per_node=-1"], "`slurm.gpus_per_node`"),
    ("slurm cpus zero", ["plan", "{r}", "slurm.cpus_per_task=0"], "`slurm.cpus_per_task`"),
    ("slurm signal negative", ["plan", "{r}", "slurm.signal_before_end_s=-1"], "`slurm.signal_before_end_s`"),
    ("seed negative", ["plan", "{r}", "seed=-1"], "`seed` must be an integer in [0, 2^32)"),
    ("seed huge", ["plan", "{r}", "seed=99999999999999"], "`seed`"),
    ("logging zero", ["plan", "{r}", "logging.every_steps=0"], "`logging.every_steps`"),
    ("classification one label", ["plan", "{r}", "task.type=classification", "task.labels=[a]"], "`task.labels` has a single class"),
    ("classification same fields", ["plan", "{r}", "task.type=classification", "task.label_field=text"], "`task.text_field` and `task.label_field`"),
    ("model path missing", ["plan", "{r}", "model.path={d}/no-model"], "no-model"),
    ("max_seq_len beyond positions", ["plan", "{r}", "data.max_seq_len=100000", *_data("long.jsonl", "text")], "max_position_embeddings (1024)"),
    # data files
    ("data missing", ["plan", "{r}", *_data("nothere.jsonl")], "nothere.jsonl does not exist"),
    ("data extension", ["plan", "{r}", *_data("data.txt")], "data.txt: unsupported extension"),
    ("data empty", ["plan", "{r}", *_data("empty.jsonl")], "empty.jsonl is empty (0 bytes)"),
    ("data blank lines", ["plan", "{r}", *_data("blank.jsonl")], "blank.jsonl has no rows"),
    ("data invalid json", ["plan", "{r}", *_data("notjson.jsonl")], "notjson.jsonl could not be read as json"),
    ("data cut short", ["plan", "{r}", *_data("cut.jsonl")], "cut.jsonl"),
    ("data latin-1 jsonl", ["plan", "{r}", *_data("latin1.jsonl", "text")], "latin1.jsonl: line 1 is not UTF-8"),
    ("csv header only", ["plan", "{r}", *_data("header.csv", "text")], "header.csv has a header line (text) but no rows"),
    ("csv empty", ["plan", "{r}", *_data("empty.csv", "text")], "empty.csv is empty"),
    ("csv one other column", ["plan", "{r}", *_data("onecol.csv", "text")], "onecol.csv, row 1: missing field `text`"),
    ("csv latin-1", ["plan", "{r}", *_data("latin1.csv", "text")], "latin1.csv could not be read as csv"),
    ("parquet corrupt", ["plan", "{r}", *_data("bad.parquet")], "bad.parquet could not be read as parquet"),
    ("eval file bad row", ["plan", "{r}", "data.eval_files=[{d}/evalbad.jsonl]"], "evalbad.jsonl, row 1"),
    ("messages field missing", ["plan", "{r}", *_data("m_missing.jsonl")], "m_missing.jsonl, row 2: missing field `messages`"),
    ("messages not a list", ["plan", "{r}", *_data("m_notlist.jsonl")], "m_notlist.jsonl, row 1"),
    ("messages empty", ["plan", "{r}", *_data("m_emptylist.jsonl")], "m_emptylist.jsonl, row 1"),
    ("message without role", ["plan", "{r}", *_data("m_norole.jsonl")], "m_norole.jsonl, row 1: message 0 must have `role`"),
    ("message bad role", ["plan", "{r}", *_data("m_badrole.jsonl")], "m_badrole.jsonl, row 1: message 1 has role 'bot'"),
    ("late system message", ["plan", "{r}", *_data("m_latesystem.jsonl")], "m_latesystem.jsonl, row 1: message 1 is a system message"),
    ("no assistant turn", ["plan", "{r}", *_data("m_noassistant.jsonl")], "m_noassistant.jsonl, row 1: the conversation has no assistant"),
    ("assistant first", ["plan", "{r}", *_data("m_assistantfirst.jsonl")], "m_assistantfirst.jsonl, row 1: the conversation must start"),
    ("content not a string", ["plan", "{r}", *_data("m_contentint.jsonl")], "m_contentint.jsonl, row 1"),
    ("content empty", ["plan", "{r}", *_data("m_contentempty.jsonl")], "m_contentempty.jsonl, row 1: field `messages[0].content` is empty"),
    ("row is a list", ["plan", "{r}", *_data("m_rowlist.jsonl")], "m_rowlist.jsonl"),
    ("third row bad", ["plan", "{r}", *_data("m_third.jsonl")], "m_third.jsonl, row 3"),
    ("alpaca no instruction", ["plan", "{r}", *_data("a_noinstruction.jsonl", "alpaca")], "a_noinstruction.jsonl, row 1: missing field `instruction`"),
    ("alpaca empty output", ["plan", "{r}", *_data("a_emptyoutput.jsonl", "alpaca")], "a_emptyoutput.jsonl, row 1: field `output` is empty"),
    ("alpaca input int", ["plan", "{r}", *_data("a_inputint.jsonl", "alpaca")], "a_inputint.jsonl, row 1: field `input` must be a string"),
    ("alpaca instruction int", ["plan", "{r}", *_data("a_instructionint.jsonl", "alpaca")], "a_instructionint.jsonl, row 1"),
    ("completion missing", ["plan", "{r}", *_data("c_nocompletion.jsonl", "completion")], "c_nocompletion.jsonl, row 1: missing field `completion`"),
    ("completion prompt int", ["plan", "{r}", *_data("c_promptint.jsonl", "completion")], "c_promptint.jsonl, row 1: field `prompt` must be a string"),
    ("completion empty", ["plan", "{r}", *_data("c_emptycompletion.jsonl", "completion")], "c_emptycompletion.jsonl, row 1"),
    ("text missing", ["plan", "{r}", *_data("t_missing.jsonl", "text")], "t_missing.jsonl, row 1: missing field `text`"),
    ("text null", ["plan", "{r}", *_data("t_null.jsonl", "text")], "t_null.jsonl, row 1"),
    ("text number", ["plan", "{r}", *_data("t_number.jsonl", "text")], "t_number.jsonl, row 1: field `text` must be a string"),
    ("huge line too long", ["plan", "{r}", *_data("huge_line.jsonl", "text"), "data.too_long=error"], "huge_line.jsonl, row 1"),
    # hostile values
    ("shell in a number", ["plan", "{r}", "train.lr=$(rm -rf /)"], "`train.lr`"),
    ("shell in model path", ["plan", "{r}", "model.path=/tmp/x; rm -rf ~"], "/tmp/x; rm -rf ~"),
    ("shell in data path", ["plan", "{r}", "data.train_files=[$(touch pwned).jsonl]"], "$(touch pwned).jsonl does not exist"),
    ("backticks in data path", ["plan", "{r}", "data.train_files=[`touch pwned`.jsonl]"], "Override `data.train_files=[`touch pwned`.jsonl]` could not be parsed"),
    ("newline in a number", ["plan", "{r}", "train.max_steps=1\n2"], "`train.max_steps`"),
    ("newline in a choice", ["plan", "{r}", "data.format=text\nmessages"], "data.format"),
    ("unicode choice", ["plan", "{r}", "strategy.backend=dееpspeed"], "strategy.backend"),
    ("unicode key", ["plan", "{r}", "train.lr✓=1"], "train.lr✓"),
    ("unicode path", ["plan", "{r}", "data.train_files=[{d}/données.jsonl]"], "données.jsonl does not exist"),
    ("huge float", ["plan", "{r}", "train.epochs=1e308", "train.max_steps=-1"], "train.epochs"),
    ("huge int", ["plan", "{r}", "train.warmup_steps=1000000000000000000000"], "train.warmup_steps"),
    ("override without key", ["plan", "{r}", "=5"], "=5"),
    ("override bad dotlist", ["plan", "{r}", "train..lr=1"], "train..lr=1"),
    ("interpolation to nothing", ["plan", "{r}", "name=${nothing}"], "name"),
    # CLI usage
    ("no command", [], "required"),
    ("unknown command", ["train", "{r}"], "invalid choice: 'train'"),
    ("plan without recipe", ["plan"], "recipe"),
    ("stray word", ["plan", "{r}", "oops"], "Override `oops` is not of the form key=value"),
    ("unknown flag", ["run", "{r}", "--bogus"], "unrecognized arguments: --bogus"),
    ("nproc not a number", ["run", "{r}", "--nproc", "two"], "--nproc: invalid int value: 'two'"),
    ("export without out", ["export", "{d}"], "--out"),
    ("export missing source", ["export", "{d}/no-run", "--out", "{d}/o"], "no-run does not exist"),
    ("export no checkpoint", ["export", "{d}", "--out", "{d}/o"], "has no complete checkpoint"),
    ("submit without recipe", ["submit"], "recipe"),
    ("run output_dir is a file", ["run", "{r}", "output_dir={d}/ok.jsonl"], "is a file, not a directory"),
    ("run output_dir under a file", ["run", "{r}", "output_dir={d}/ok.jsonl/run"], "is inside"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-input")
    for name, content in FILES.items():
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (d / "r.yaml").write_text(RECIPE.format(d=d))
    for name, content in RECIPES.items():
        (d / name).write_text(content)
    return d


def test_the_corpus_is_large():
    assert len(CASES) >= 80 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv,named", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_a_short_message(corpus, cache_dir, capsys, argv, named):
    fill = {"d": str(corpus), "r": str(corpus / "r.yaml")}
    argv = [a.replace("{d}", fill["d"]).replace("{r}", fill["r"]) for a in argv]
    named = named.replace("{d}", fill["d"])
    if argv and argv[0] in ("plan", "run", "submit") and len(argv) > 1:
        argv.append(f"data.cache_dir={cache_dir}")
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    # a usage error prints the command list (two lines a command); everything else a few lines
    assert 1 <= len(lines) <= (16 if lines[0].startswith("usage:") else 12), err
    assert named in err, err
