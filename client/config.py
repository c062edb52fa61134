"""A hospital site's settings (site.toml): its data, how its SuperNode reaches the SuperLink, and its rules.

Read by `fedecho client start` (to start the SuperNode), by the ClientApp (which finds this file through the
node config key `site-config`), by its runner (`fedecho.client.runtime`) and by `fedecho audit --site`, all
through `load_site_config`. The file has exactly the tables in SITE_TABLES: [site] (data, cache, state folder,
threads, device, devices), [superlink], [supernode], [policy] (`fedecho.client.policy`) and [privacy]
(`fedecho.privacy.dp_policy`). Any other table, or a field a table does not have, is an error naming the
closest known name: a misspelt `[privcy]` must not leave a site training without the DP it asked for.
Relative paths are taken from the file's folder.

`check_data` and `settings_in_force` are for `fedecho client start`: the data folder checked before the site
joins, and what is in force stated (and written to the site's audit log, `fedecho.client.audit.audit_start`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedecho._proc import StateFolder, is_loopback
from fedecho._toml import ConfigError, Table, check_sections, read_toml
from fedecho.client.policy import DEFAULT_POLICY, SitePolicy, parse_policy
from fedecho.privacy.dp_policy import DEFAULT_PRIVACY, PrivacyPolicy, PrivacyRefused, parse_privacy, unit_in_force
from fedecho.security.certs import CertError, split_host_port

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_SUPERNODE_PORT = 9094
SITE_TABLES = ("site", "superlink", "supernode", "policy", "privacy")  # every table any reader of site.toml knows


@dataclass(frozen=True)
class SiteConfig(StateFolder):
    """One site; see configs/site.example.toml for each field."""

    path: Path
    name: str
    data: Path  # EchoNet-Dynamic folder or DICOM archive
    labels: Path | None  # DICOM archives: the site's labels CSV (None: next to the data / not needed)
    cache: Path
    state: Path
    threads: int
    device: str
    devices: int  # data-parallel training over this many devices of `device` (fedecho.train.parallel)
    superlink: str  # host:port of the SuperLink
    ca: Path | None
    private_key: Path | None
    public_key: Path | None
    supernode_host: str
    supernode_port: int
    policy: SitePolicy = DEFAULT_POLICY  # [policy]: what this site agrees to do (fedecho.client.policy)
    privacy: PrivacyPolicy = DEFAULT_PRIVACY  # [privacy]: DP-SGD, budget and delta (fedecho.privacy.dp_policy)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the whole file, for the ClientApp's own tables

    @property
    def superlink_is_loopback(self) -> bool:
        return is_loopback(split_host_port(self.superlink)[0])


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and check a site.toml; mistakes raise ConfigFileError naming the file and the field."""
    path = Path(path).resolve()
    raw = read_toml(path)
    check_sections(raw, path, SITE_TABLES)
    site = Table(raw, path, "site")
    link = Table(raw, path, "superlink", required=False)
    node = Table(raw, path, "supernode", required=False)
    name = site.text("name")
    if not name:
        raise site.error("name", "must not be empty")
    superlink = link.text("address", "127.0.0.1:9093")
    try:
        host, port = split_host_port(superlink)
    except CertError as e:
        raise link.error("address", str(e)) from e
    if not host or port is None:
        raise link.error("address", f"must be HOST:PORT, not {superlink!r}")
    cfg = SiteConfig(
        path=path,
        name=name,
        data=site.location("data"),
        labels=site.optional_location("labels"),
        cache=site.location("cache"),
        state=site.location("state"),
        threads=site.integer("threads", 2, minimum=1),
        device=site.choice("device", DEVICES, "auto"),
        devices=site.integer("devices", 1, minimum=1),
        superlink=superlink,
        ca=link.optional_location("ca"),
        private_key=link.optional_location("private_key"),
        public_key=link.optional_location("public_key"),
        supernode_host=node.text("host", "127.0.0.1"),
        supernode_port=node.integer("port", DEFAULT_SUPERNODE_PORT, minimum=1),
        policy=parse_policy(raw, path),
        privacy=parse_privacy(raw, path),
        raw=raw,
    )
    if cfg.devices > 1:
        _check_devices(cfg, site)
    if cfg.supernode_port > 65535:
        raise node.error("port", f"must be at most 65535, not {cfg.supernode_port}")
    for table in (site, link, node):
        table.finish()
    return cfg


def _check_devices(cfg: SiteConfig, site: Table) -> None:
    """[site] devices > 1 must be granted here: GPUs when the device is (or defaults to) CUDA, else CPU processes
    whose threads are [site] threads split over them."""
    import torch

    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda and cfg.devices > torch.cuda.device_count():
        raise site.error("devices", f"is {cfg.devices} but {torch.cuda.device_count()} CUDA device(s) are visible")
    if not cuda and cfg.devices > cfg.threads:
        threads = cfg.threads
        raise site.error("devices", f"is {cfg.devices} CPU processes but [site] threads = {threads}: each needs one")


@dataclass(frozen=True)
class DataIndex:
    """What the site's data folder holds, from its index (file lists, headers): no video decoded."""

    kind: str  # the source format (echonet, dicom, registered, ...)
    splits: dict[str, int]  # videos per split ("" for videos without one)
    train_groups: list[str | None]  # the patient id of each training video (None: the source has none)
    problems: int  # files the scan skipped


def _data_index(cfg: SiteConfig) -> DataIndex:
    """Scan [site].data; errors are ConfigErrors naming the file, the field and the path."""
    where = f"{cfg.path}: [site].data = {cfg.data}"
    if not cfg.data.exists():
        raise ConfigError(f"{where} does not exist")
    if not cfg.data.is_dir():
        raise ConfigError(f"{where} is not a folder")
    if not any(cfg.data.iterdir()):
        raise ConfigError(f"{where} is empty")
    from fedecho.data.records import SourceError
    from fedecho.data.source import detect_source, open_source

    kind = detect_source(cfg.data)
    if kind is None:
        raise ConfigError(
            f"{where} holds no EchoNet-Dynamic FileList.csv, CAMUS, TMED-2, DICOM files or registered site data "
            "(site.db): `fedecho data inspect` shows what it holds"
        )
    try:
        scan = open_source(cfg.data, kind, **({"labels": str(cfg.labels)} if cfg.labels else {})).scan()
    except (SourceError, OSError) as e:
        raise ConfigError(f"{where}: {e}") from e
    if not scan.records:
        raise ConfigError(
            f"{where} holds no video the {kind} reader can use ({len(scan.problems)} file(s) skipped): "
            "`fedecho data inspect` says why"
        )
    splits: dict[str, int] = {}
    for r in scan.records:
        splits[r.split] = splits.get(r.split, 0) + 1
    groups = [r.group or None for r in scan.records if r.split == "train"]
    return DataIndex(kind, splits, groups, len(scan.problems))


def check_data(cfg: SiteConfig) -> None:
    """Raise ConfigError when [site].data does not exist, is empty, or holds no video fedecho's readers know
    (naming the file, the field and the path); reads the data index only, never decodes a video. A site that
    would fail every round for want of data must not join."""
    _data_index(cfg)


def _origin(cfg: SiteConfig, table: str, key: str) -> str:
    """' (default)' when site.toml does not set [table].key, else ''."""
    section = cfg.raw.get(table, {})
    return "" if isinstance(section, dict) and key in section else " (default)"


def settings_in_force(cfg: SiteConfig) -> list[str]:
    """What this site enforces, one human line each: privacy (DP mode, budget, delta, noise floor, clipping, the
    privacy unit and how it was decided from the data index), policy (phases, tasks, models, local steps,
    minimum videos and patients) and code approval. Every value the file does not set is marked "(default)".
    Raises ConfigError as `check_data` does."""
    index = _data_index(cfg)
    pv, pol = cfg.privacy, cfg.policy
    split_text = ", ".join(f"{n} {s or 'without split'}" for s, n in sorted(index.splits.items()))
    with_ids = sum(g is not None for g in index.train_groups)
    lines = [
        f"data: {cfg.data} ({index.kind}; {sum(index.splits.values())} videos: {split_text}; "
        f"{with_ids} of {len(index.train_groups)} training videos with a patient id"
        + (f"; {index.problems} file(s) skipped" if index.problems else "")
        + ")",
    ]
    if pv.dp == "required":
        lines.append(f'privacy: DP-SGD in every training round (dp = "required"){_origin(cfg, "privacy", "dp")}')
    else:
        lines.append(
            f'privacy: DP-SGD only when the run file asks for it (dp = "optional"){_origin(cfg, "privacy", "dp")}'
        )
    if pv.epsilon_max > 0:
        budget = f"at most epsilon {pv.epsilon_max:g} over all runs"
    else:
        budget = "no cap on epsilon (epsilon_max = 0), every DP round still accounted"
    lines.append(f"privacy budget: {budget}{_origin(cfg, 'privacy', 'epsilon_max')}, at delta {pv.delta:g}"
                 f"{_origin(cfg, 'privacy', 'delta')}")  # fmt: skip
    lines.append(
        f"privacy noise floor: noise multiplier at least {pv.min_noise_multiplier:g}"
        f"{_origin(cfg, 'privacy', 'min_noise_multiplier')}; clipping bound when a run sets none: "
        f"{pv.max_grad_norm:g}{_origin(cfg, 'privacy', 'max_grad_norm')}"
    )
    try:
        unit, how = unit_in_force(pv, index.train_groups)
        lines.append(f"privacy unit: one {unit} ({how})")
    except PrivacyRefused as e:
        lines.append(f"privacy unit: none, every DP round is refused ({e})")
    phases = ", ".join(pol.phases)
    tasks = ", ".join(pol.tasks) if pol.tasks is not None else "any"
    models = ", ".join(pol.models) if pol.models is not None else "any"
    table = "" if "policy" in cfg.raw else " (no [policy] table: the defaults)"
    lines.append(f"policy: phases {phases}; tasks {tasks}; models {models}{table}")
    steps = f"at most {pol.max_local_steps}" if pol.max_local_steps else "no bound on the"
    lines.append(f"policy: {steps} local steps per round{_origin(cfg, 'policy', 'max_local_steps')}")
    patients = (
        f", of at least {pol.min_patients} patients{_origin(cfg, 'policy', 'min_patients')} where every video has "
        "a patient id"
        if pol.min_patients
        else ", patients not counted (min_patients = 0)"
    )
    lines.append(
        f"policy: at least {pol.min_videos} videos{_origin(cfg, 'policy', 'min_videos')} behind every update and "
        f"every metric{patients}"
    )
    lines.append(f"code approval: {_approvals(cfg)}")
    where = cfg.device if cfg.device != "auto" else "cuda when available, else cpu"
    spread = f", data-parallel over {cfg.devices} devices" if cfg.devices > 1 else ""
    lines.append(f"training: {where}{spread}; {cfg.threads} CPU threads{_origin(cfg, 'site', 'threads')}")
    return lines


def _approvals(cfg: SiteConfig) -> str:
    import fedecho

    fedecho_bundle = f"the fedecho {fedecho.__version__} bundle (the code installed here)"
    try:
        from fedecho.client.audit import SiteLog

        with SiteLog(cfg.state, create=False) as log:
            approved = log.approvals()
    except FileNotFoundError:
        approved = []
    if not approved:
        return f"only {fedecho_bundle}; no other bundle approved"
    hashes = ", ".join(sha[:12] for sha, _, _ in approved)
    return f"{fedecho_bundle} and {len(approved)} approved bundle(s): {hashes}"
