# The nanoGPT-style configurator: a config file, --key=value overrides, errors, --help.
import pytest

from model import configure

SCRIPT = '''\
import math
# data
data_path = "data/demo.jsonl"  # JSONL problems
batch_size = 8  # sequences per step, per rank
# optim
learning_rate = 1e-5  # peak LR
betas = (0.9, 0.95)
compile = False  # torch.compile the model
wandb_project = None  # set to log to wandb
extra = {"a": 1}
MAX_CONST = 3
_private = 1
def helper():
    pass
class Thing:
    pass
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    g = {"__file__": str(path), "__name__": "__main__"}
    exec(compile(SCRIPT, str(path), "exec"), g)
    return g


def test_keys_and_overrides(script):
    cfg = configure(script, ["--batch_size=16", "--learning_rate=3", "--betas=[0.8, 0.9]", "--compile=True",
                             "--data_path=other.jsonl", "--wandb_project=ovr"])
    assert set(cfg) == {"data_path", "batch_size", "learning_rate", "betas", "compile", "wandb_project", "extra"}
    assert cfg["batch_size"] == 16 and script["batch_size"] == 16
    assert cfg["learning_rate"] == 3.0 and isinstance(script["learning_rate"], float)  # int -> float
    assert script["betas"] == (0.8, 0.9) and script["compile"] is True
    assert script["data_path"] == "other.jsonl" and script["wandb_project"] == "ovr"


def test_string_key_keeps_raw_text(script):
    configure(script, ["--data_path=123"])
    assert script["data_path"] == "123"


def test_config_file_then_overrides(script, tmp_path):
    cfg_file = tmp_path / "preset.py"
    cfg_file.write_text("import os\nbatch_size = 4\nlearning_rate = 2e-5\n_tmp = 7\nwandb_project = 'x'\n")
    cfg = configure(script, [str(cfg_file), "--batch_size=2", "--wandb_project=None"])
    assert cfg["batch_size"] == 2 and cfg["learning_rate"] == 2e-5 and cfg["wandb_project"] is None


def test_unknown_key_suggests_close_match(script, tmp_path):
    with pytest.raises(SystemExit, match="learnig_rate.*learning_rate"):
        configure(script, ["--learnig_rate=1e-4"])
    bad = tmp_path / "bad.py"
    bad.write_text("batch_sise = 4\n")
    with pytest.raises(SystemExit, match="batch_sise.*batch_size"):
        configure(script, [str(bad)])
    with pytest.raises(SystemExit, match="MAX_CONST"):
        configure(script, ["--MAX_CONST=4"])


@pytest.mark.parametrize("arg", ["--batch_size=abc", "--batch_size=1.5", "--compile=1", "--betas=0.9",
                                 "--learning_rate=fast", "--extra=[1]", "--batch_size"])
def test_wrong_type_exits(script, arg):
    with pytest.raises(SystemExit) as e:
        configure(script, [arg])
    assert e.value.code != 0


def test_missing_config_file_exits(script):
    with pytest.raises(SystemExit, match="nope.py"):
        configure(script, ["nope.py"])


def test_help_lists_keys_defaults_comments(script, capsys):
    with pytest.raises(SystemExit) as e:
        configure(script, ["--batch_size=3", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "batch_size" in out and "8" in out and "sequences per step, per rank" in out
    assert "torch.compile the model" in out and "'data/demo.jsonl'" in out and "extra" in out
    assert "helper" not in out and "MAX_CONST" not in out and "_private" not in out and "math" not in out
    assert script["batch_size"] == 8  # --help changes nothing
