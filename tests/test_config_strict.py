"""Every config fedecho reads is strict: an unknown section or field is an error that names the file, the section
(and field) and the closest known name, so a typo never silently falls back to a default. Every shipped config
loads with its own loader."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from builders import tiny_run
from fedecho._toml import ConfigError, check_sections, did_you_mean
from fedecho.client.config import SITE_TABLES, load_site_config
from fedecho.fl.config import load_fed_run_config, parse_run_config
from fedecho.server.config import load_server_config
from fedecho.train.config import load_run_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Each shipped config and the loader that reads it (a new file must be added here: the test below insists).
LOADERS = {
    "server.toml": load_server_config,
    "site.example.toml": load_site_config,
    "quickstart.toml": load_fed_run_config,
    "bench_accuracy.toml": load_fed_run_config,
    "lockstep.toml": load_fed_run_config,
    "paper_federated.toml": load_fed_run_config,
    "paper_echonet.toml": load_run_config,
    "phantom_tiny.toml": load_run_config,
}

SITE = '[site]\nname = "h1"\ndata = "data"\ncache = "cache"\nstate = "state"\n'


def _shipped() -> list[str]:
    """The configs the repository ships (tracked by git): the deployment walk-through writes its own site files
    into configs/ too, and those are the user's, not shipped."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "*.toml"], cwd=CONFIGS, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file there
        return sorted(p.name for p in CONFIGS.glob("*.toml"))
    return sorted(Path(line).name for line in out.splitlines() if "/" not in line)


def test_every_shipped_config_loads_with_its_loader() -> None:
    shipped = _shipped()
    assert shipped == sorted(LOADERS), "a config in configs/ has no loader in LOADERS (or one is gone)"
    for name, load in LOADERS.items():
        assert load(CONFIGS / name) is not None, name


def _error(path: Path, text: str, load: object) -> str:
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load(path)  # type: ignore[operator]
    assert str(path) in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        ('[privcy]\ndp = "required"\nepsilon_max = 8\n', "unknown section [privcy] (did you mean [privacy]?)"),
        ('[polcy]\nphases = ["finetune"]\n', "unknown section [polcy] (did you mean [policy]?)"),
        ('[superlnk]\naddress = "h:1"\n', "unknown section [superlnk] (did you mean [superlink]?)"),
        ("[privacy]\nepsilon_mx = 8\n", "[privacy]: unknown field(s) epsilon_mx (did you mean 'epsilon_max'?)"),
        ("[policy]\nmin_video = 3\n", "[policy]: unknown field(s) min_video (did you mean 'min_videos'?)"),
        ("[supernode]\nprot = 9100\n", "[supernode]: unknown field(s) prot (did you mean 'port'?)"),
        ("[privacy]\nunit = 3\n", "[privacy].unit must be a string"),
    ],
)
def test_site_toml_rejects_unknown_sections_and_fields(extra: str, expect: str, tmp_path: Path) -> None:
    assert expect in _error(tmp_path / "site.toml", SITE + extra, load_site_config)


def test_site_toml_field_typo_in_site_table_is_named(tmp_path: Path) -> None:
    message = _error(tmp_path / "site.toml", SITE + "treads = 4\n", load_site_config)
    assert "[site]: unknown field(s) treads (did you mean 'threads'?)" in message


def test_a_site_with_every_table_loads_and_the_known_set_is_complete(tmp_path: Path) -> None:
    """The tables every reader of site.toml knows, one each: nothing a reader uses is refused as unknown."""
    text = SITE + (
        '[superlink]\naddress = "127.0.0.1:9093"\n[supernode]\nport = 9100\n'
        '[policy]\nphases = ["pretrain"]\nmin_videos = 20\n[privacy]\ndp = "optional"\nunit = "video"\n'
    )
    path = tmp_path / "site.toml"
    path.write_text(text)
    cfg = load_site_config(path)
    assert set(cfg.raw) == set(SITE_TABLES)
    assert cfg.policy.min_videos == 20 and cfg.privacy.unit == "video" and cfg.supernode_port == 9100


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ('[sever]\naddress = "h:1"\n', "unknown section [sever] (did you mean [server]?)"),
        ('[server]\naddress = "h:1"\n[front]\nport = 1\n', "unknown section [front]; known: [server]"),
        (
            '[server]\naddress = "h:1"\nround_timout = 5\n',
            "unknown field(s) round_timout (did you mean 'round_timeout'?)",
        ),
    ],
)
def test_server_toml_rejects_unknown_sections_and_fields(text: str, expect: str, tmp_path: Path) -> None:
    assert expect in _error(tmp_path / "server.toml", text, load_server_config)


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (("[finetune]", "[fintune]"), "unknown section [fintune] (did you mean [finetune]?)"),
        (("[run]", "[dp]\nenabled = false\n[rnu]"), "unknown section [rnu] (did you mean [run]?)"),
        (('wire_dtype = "float32"', 'wire_dtpye = "float32"'), "[run]: unknown field(s) wire_dtpye (did you mean"),
        (("steps = 1\nbatch_size = 2", "steps = 1\nbatchsize = 2"), "batchsize (did you mean 'batch_size'?)"),
        (("num_frames = 8", "num_frame = 8"), "[model]: unknown field(s) num_frame (did you mean 'num_frames'?)"),
        (('name = "fedavg"', 'name = "fedavgg"'), "(did you mean 'fedavg'?)"),
        (
            ('name = "fedavg"', 'name = "fedprox"\nproximal_mo = 0.1'),
            "proximal_mo is not a parameter of fedprox (did you mean 'proximal_mu'?)",
        ),
    ],
)
def test_run_files_reject_unknown_sections_and_fields(edit: tuple[str, str], expect: str) -> None:
    text = tiny_run()
    assert edit[0] in text, edit
    with pytest.raises(ConfigError) as e:
        parse_run_config(text.replace(edit[0], edit[1], 1), "run.toml")
    assert str(e.value).startswith("run.toml:") and expect in str(e.value), str(e.value)


def test_local_run_file_rejects_unknown_sections(tmp_path: Path) -> None:
    text = (CONFIGS / "phantom_tiny.toml").read_text().replace("[pretrain]", "[pretrian]")
    assert "unknown section [pretrian] (did you mean [pretrain]?)" in _error(tmp_path / "x.toml", text, load_run_config)


def test_the_shared_check_and_hint() -> None:
    check_sections({"site": {}}, "f.toml", ["site"])
    with pytest.raises(ConfigError, match=r"^f\.toml: unknown section \[zzz\]; known: \[site\]$"):
        check_sections({"site": {}, "zzz": {}}, "f.toml", ["site"])
    assert did_you_mean("privcy", ["privacy", "policy"], brackets=True) == " (did you mean [privacy]?)"
    assert did_you_mean("xyz", ["privacy"]) == ""
