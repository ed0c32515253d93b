"""What makes the app safe to share, called directly (no server): owners and tokens, per-session limits, uploads
within quotas, the training-job queue (a fake launcher stands in for the training child), and the Fine-tune tab's
end-of-session cleanup and its refusal of an uploaded dataset that names a file outside itself."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import gradio as gr
import PIL.Image
import pyarrow as pa
import pytest
import torch

import app_support.jobs as jobs_module
import app_support.session_limits as session_limits_module
import app_support.uploads as uploads_module
from app_support.archives import ArchiveError
from app_support.downloads import DownloadFolder
from app_support.errors import UserFacingError
from app_support.finetune_tab import FinetuneServices, FinetuneTab
from app_support.jobs import JOB_FILE, Job, JobBusyError, NotYourJobError, TrainingJobs
from app_support.model_choices import ModelRegistry
from app_support.owners import (
    ADMIN_TOKEN_ENV,
    SPACE_AUTHOR_ENV,
    Identities,
    Owner,
    owner_of_browser,
    owner_of_job_token,
    owner_of_login,
    token_hash,
    token_matches,
)
from app_support.paths import AppPaths
from app_support.session_limits import RateLimit, SessionLimits, TooManyRequestsError
from app_support.training import CheckpointPreviews
from app_support.uploads import UploadQuotaError, UploadStore
from app_support.visitors import Visitors
from finetune.config import TrainConfig
from finetune.data.formats.archive import ArchiveLimits
from finetune.run.checkpoints import latest_checkpoint, save_checkpoint
from finetune.run.files import CHECKPOINTS, MODEL_DIR, TRAIN_CONFIG, write_status

ALICE = owner_of_login("alice")
BOB = owner_of_login("bob")
CAROL = owner_of_login("carol")
MALLORY = owner_of_login("mallory")
SHAPES = "shapes:train=16,validation=4,test=0,size=128"
DESCRIPTION = "alice's private dataset"


def page(session: str | None) -> SimpleNamespace:
    """What a handler's ``gr.Request`` is to the limits: something with a ``session_hash``."""
    return SimpleNamespace(session_hash=session)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- owners ------------------------------------------------------------------------------------------------------ #


def test_a_browser_token_owns_only_when_this_server_issued_it(tmp_path: Path) -> None:
    visitors = Visitors(tmp_path / "visitors")
    identities = Identities(visitors)
    token, folder = visitors.claim(None)
    assert folder.is_dir() and folder.parent == visitors.root and len(token) == 32
    assert visitors.claim(token) == (token, folder)  # a reload keeps the browser's token
    owner = identities.owner(token)
    assert owner is not None and owner.key.startswith("br-") and owner.label == "this browser"
    assert identities.owner(token) == owner and identities.owner_key(token) == owner.key
    other, _ = visitors.claim(None)
    assert other != token and identities.owner_key(other) not in (None, owner.key)

    (visitors.root / "handmade").mkdir()
    forged = secrets.token_urlsafe(24)  # the shape the server issues, but never issued
    for bad in (None, "", forged, "handmade", "..", ".", "../" + token[3:], token + "x", token[:-1], str(folder)):
        assert identities.owner(bad) is None, bad
        assert identities.owner_key(bad) is None, bad
    fresh, fresh_folder = visitors.claim(forged)  # a forged token is replaced, not adopted
    assert fresh not in (forged, token, other) and fresh_folder.is_dir() and not (visitors.root / forged).exists()


def test_a_login_owns_by_username_in_any_browser(tmp_path: Path) -> None:
    visitors = Visitors(tmp_path / "visitors")
    identities = Identities(visitors)
    token, _ = visitors.claim(None)
    alice = identities.owner(None, SimpleNamespace(username="alice"))
    assert alice == identities.owner(token, SimpleNamespace(username="alice")) == ALICE
    assert alice.label == "alice" and alice.key.startswith("hf-")
    assert alice.key != identities.owner_key(token)  # the login wins over the browser
    assert identities.owner_key(token, SimpleNamespace(username="bob")) not in (alice.key, identities.owner_key(token))
    # No username is no login: the browser decides (and without a known browser, nobody).
    for blank in (SimpleNamespace(username=""), SimpleNamespace(username=None), object(), None):
        assert identities.owner(token, blank) == owner_of_browser(token)
        assert identities.owner(None, blank) is None
    # A login spelled like someone's browser token is still not that browser.
    assert owner_of_login(token).key != owner_of_browser(token).key


def test_owner_keys_and_labels_never_contain_the_token() -> None:
    browser = secrets.token_urlsafe(24)
    job_token, job_owner = owner_of_job_token()
    for secret, owner in ((browser, owner_of_browser(browser)), (job_token, job_owner)):
        assert re.fullmatch(r"(br|tk)-[0-9a-f]{24}", owner.key), owner.key
        assert secret not in owner.key and secret not in owner.label
        assert secret[:8] not in owner.key  # not even a prefix of it
    assert re.fullmatch(r"hf-[0-9a-f]{24}", ALICE.key)


def test_job_tokens_are_fresh_and_only_their_hash_is_compared() -> None:
    token, owner = owner_of_job_token()
    other, other_owner = owner_of_job_token()
    assert token != other and owner.key != other_owner.key and owner.key.startswith("tk-")
    assert len(token) >= 32 and owner.label == "the token's holder"
    stored = token_hash(token)
    assert re.fullmatch(r"[0-9a-f]{64}", stored) and token not in stored
    assert token_matches(token, stored)
    for wrong in (other, token[:-1], token + "x", token.upper(), "", None, 123, stored):
        assert not token_matches(wrong, stored), wrong  # type: ignore[arg-type]
    for missing in (None, "", token):  # nothing stored, or the token itself stored as if it were the hash
        assert not token_matches(token, missing)


def test_admin_by_admin_token_or_by_the_space_authors_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    visitors = Visitors(tmp_path / "visitors")
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    monkeypatch.setenv(SPACE_AUTHOR_ENV, "")
    nobody = Identities.from_environment(visitors)  # no admin configured: nothing unlocks it
    for token in (None, "", "anything", token_hash("")):
        assert not nobody.is_admin(token)
    for name in ("", None, "anyone"):
        assert not nobody.is_admin(None, SimpleNamespace(username=name))

    monkeypatch.setenv(ADMIN_TOKEN_ENV, "env-admin-secret")
    monkeypatch.setenv(SPACE_AUTHOR_ENV, "the-author")
    identities = Identities.from_environment(visitors)
    assert identities.is_admin("env-admin-secret")
    assert identities.is_admin(None, SimpleNamespace(username="the-author"))
    assert identities.is_admin("wrong", SimpleNamespace(username="the-author"))
    for token in (None, "", "env-admin-secre", "env-admin-secret ", token_hash("env-admin-secret")):
        assert not identities.is_admin(token), token
        assert not identities.is_admin(token, SimpleNamespace(username="mallory"))
    assert "env-admin-secret" not in repr(vars(identities))  # only its hash is kept
    # The author is an owner like any other login; being admin gives no ownership.
    assert identities.owner(None, SimpleNamespace(username="the-author")) == owner_of_login("the-author")

    explicit = Identities.from_environment(visitors, admin_token="flag-secret")  # --admin-token wins
    assert explicit.is_admin("flag-secret") and not explicit.is_admin("env-admin-secret")


# -- per-session limits ------------------------------------------------------------------------------------------ #


def test_session_limits_cap_each_session_and_all_sessions_together() -> None:
    assert issubclass(TooManyRequestsError, UserFacingError)  # the visitor is told why
    limits = SessionLimits("streams", per_session=2, total=3)
    a, b, c = page("a"), page("b"), page("c")
    with contextlib.ExitStack() as held:
        held.enter_context(limits.hold(a))
        held.enter_context(limits.hold(a))
        with pytest.raises(TooManyRequestsError, match="at most 2 per visitor"):
            held.enter_context(limits.hold(a))
        held.enter_context(limits.hold(b))
        for request in (b, c):
            with pytest.raises(TooManyRequestsError, match="the server has 3 streams open"):
                held.enter_context(limits.hold(request))
    # Every slot (and no refused attempt) was given back.
    with limits.hold(c), limits.hold(c), limits.hold(a):
        pass
    # Requests without a session share one key.
    shared = SessionLimits("checks", per_session=2, total=10)
    with shared.hold(None), shared.hold(page("")), pytest.raises(TooManyRequestsError), shared.hold(SimpleNamespace()):
        pass


def test_a_slot_is_given_back_when_the_event_fails_or_its_stream_is_closed() -> None:
    limits = SessionLimits("checks", per_session=1, total=1)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="boom"), limits.hold(page("a")):
            raise RuntimeError("boom")

    def stream() -> Iterator[int]:
        with limits.hold(page("a")):
            yield 1
            yield 2

    started = stream()
    assert next(started) == 1
    with pytest.raises(TooManyRequestsError), limits.hold(page("b")):  # the open stream holds the only slot
        pass
    started.close()  # the page went away mid-stream
    with limits.hold(page("b")):
        pass


def test_rate_limit_is_a_sliding_window_per_session(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(session_limits_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    limit = RateLimit("status", calls=3, seconds=1.0)
    a, b = page("a"), page("b")
    for moment in (100.0, 100.4, 100.8):
        now[0] = moment
        limit.check(a)
    with pytest.raises(TooManyRequestsError, match="at most 3 every 1 s"):
        limit.check(a)
    limit.check(b)  # each session has its own window
    now[0] = 100.9
    with pytest.raises(TooManyRequestsError):
        limit.check(a)
    now[0] = 101.05  # the call at 100.0 left the window (and the refused ones never counted)
    limit.check(a)
    with pytest.raises(TooManyRequestsError):
        limit.check(a)
    now[0] = 101.45  # so did the one at 100.4
    limit.check(a)
    now[0] = 200.0
    for _ in range(3):
        limit.check(a)

    small = RateLimit("status", calls=1, seconds=60.0)
    small.MAX_SESSIONS = 2
    small.check(a)
    with pytest.raises(TooManyRequestsError):
        small.check(a)
    small.check(b)
    small.check(page("c"))  # a third session: the least recently used one (a) is forgotten
    small.check(a)


# -- uploads ----------------------------------------------------------------------------------------------------- #


def blob_zip(path: Path, size: int) -> Path:
    """A zip of one incompressible file ``set/blob.bin`` of ``size`` bytes (stored: nothing looks like a bomb)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("set/blob.bin", os.urandom(size))
    return path


def lie_about_sizes(archive: Path, declared: int) -> Path:
    """Rewrite the central directory so that every member declares ``declared`` bytes unpacked."""
    raw = bytearray(archive.read_bytes())
    start = raw.find(b"PK\x01\x02")
    while start != -1:
        struct.pack_into("<I", raw, start + 24, declared)  # uncompressed size
        start = raw.find(b"PK\x01\x02", start + 4)
    archive.write_bytes(bytes(raw))
    return archive


def everything(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def files(root: Path) -> list[Path]:
    return [path for path in everything(root) if path.is_file()]


@pytest.fixture
def extractions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The archives ``UploadStore`` asked the unpacker to unpack."""
    calls: list[Path] = []
    real = uploads_module.extract_zip

    def recording(archive: Path, *args: Any, **kwargs: Any) -> Path:
        calls.append(Path(archive))
        return real(archive, *args, **kwargs)

    monkeypatch.setattr(uploads_module, "extract_zip", recording)
    return calls


def test_the_same_zip_is_unpacked_once_per_owner(tmp_path: Path, extractions: list[Path]) -> None:
    store = UploadStore(tmp_path / "uploads")
    archive = blob_zip(tmp_path / "a.zip", 10_000)
    first = store.unpack("br-alice", archive)
    with zipfile.ZipFile(archive) as opened:
        assert first.name == "set" and (first / "blob.bin").read_bytes() == opened.read("set/blob.bin")
    renamed = tmp_path / "renamed.zip"
    renamed.write_bytes(archive.read_bytes())
    assert store.unpack("br-alice", archive) == first
    assert store.unpack("br-alice", renamed) == first  # named by its bytes, not its file name
    assert len(extractions) == 1 and len(list((store.root / "br-alice").iterdir())) == 1

    bobs = store.unpack("br-bob", archive)  # another owner never shares a folder
    assert bobs != first and bobs.is_relative_to(store.root / "br-bob") and len(extractions) == 2
    for bad in ("", "../br-alice", ".hidden", "br-alice/..", "a/b"):
        with pytest.raises(ValueError, match="not an owner key"):
            store.unpack(bad, archive)
    assert len(extractions) == 2


def test_quotas_refuse_before_unpacking_and_leave_nothing_behind(tmp_path: Path, extractions: list[Path]) -> None:
    store = UploadStore(tmp_path / "uploads", per_owner_bytes=150_000, total_bytes=250_000)
    a, b, c = (blob_zip(tmp_path / f"{name}.zip", 100_000) for name in "abc")
    alices = store.unpack("br-alice", a)
    before = everything(store.root)
    with pytest.raises(UploadQuotaError, match="your uploads already use"):
        store.unpack("br-alice", b)  # 100 kB more than her 150 kB allow
    assert len(extractions) == 1 and everything(store.root) == before  # refused on the declared sizes

    store.unpack("br-bob", b)  # each owner has their own quota ...
    before = everything(store.root)
    with pytest.raises(UploadQuotaError, match="upload space is full"):
        store.unpack("br-carol", c)  # ... and all of them one total
    assert len(extractions) == 2 and everything(store.root) == before
    assert issubclass(UploadQuotaError, UserFacingError)

    store.release("br-alice")
    assert not alices.exists()
    assert (store.unpack("br-carol", c) / "blob.bin").stat().st_size == 100_000  # room again


def test_a_zip_whose_declared_sizes_lie_is_still_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = UploadStore(tmp_path / "uploads", per_owner_bytes=50_000, total_bytes=10**9)
    honest = store.unpack("br-alice", blob_zip(tmp_path / "small.zip", 20_000))
    kept = files(store.root)

    # The central directory says 10 bytes where 100 kB are stored: the cheap check passes, the unpacker does not.
    lying = lie_about_sizes(blob_zip(tmp_path / "lying.zip", 100_000), declared=10)
    with zipfile.ZipFile(lying) as opened:
        assert sum(info.file_size for info in opened.infolist()) == 10
    with pytest.raises(ArchiveError):
        store.unpack("br-alice", lying)
    assert files(store.root) == kept

    # Should a declaration ever pass the cheap check, what was really written is counted after unpacking.
    monkeypatch.setattr(uploads_module, "_declared_bytes", lambda archive: 0)
    with pytest.raises(UploadQuotaError, match="unpacks to 0 MB"):
        store.unpack("br-alice", blob_zip(tmp_path / "big.zip", 40_000))  # 20 kB + 40 kB > 50 kB
    assert files(store.root) == kept and list((store.root / "br-alice").iterdir()) == [honest.parents[1]]

    # And the unpacker stops at its own limit, whatever the quotas.
    roomy = UploadStore(tmp_path / "roomy", limits=ArchiveLimits(max_unpacked_bytes=50_000, max_ratio=200))
    with pytest.raises(ArchiveError, match="unpacks to more than"):
        roomy.unpack("br-alice", blob_zip(tmp_path / "over.zip", 60_000))
    assert files(roomy.root) == []


def test_discard_release_and_clear(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "uploads")
    zips = [blob_zip(tmp_path / f"{n}.zip", 1_000) for n in range(3)]
    first, second = store.unpack("br-alice", zips[0]), store.unpack("br-alice", zips[1])
    bobs = store.unpack("br-bob", zips[2])

    def upload_of(dataset: Path) -> Path:  # <root>/<owner>/<upload>/content/set
        return dataset.parents[1]

    store.discard(first)  # a refused dataset: its whole upload goes, nothing else
    assert not upload_of(first).exists() and second.is_dir() and bobs.is_dir()
    store.discard(second, keep=[second])  # a job trains on it (a re-check of it failed): it stays
    assert second.is_dir()
    store.discard(tmp_path / "elsewhere")
    store.discard(store.root / "br-bob")  # an owner's folder is not an upload
    assert second.is_dir() and bobs.is_dir()

    first = store.unpack("br-alice", zips[0])
    store.release("br-alice", keep=[second])  # a job trains on the second: only the first goes
    assert not upload_of(first).exists() and second.is_dir() and bobs.is_dir()
    store.release("br-alice", keep=[second / "blob.bin"])  # any path inside an upload keeps it
    assert second.is_dir()
    for bad in ("../br-bob", "..", "br-nobody", ""):
        store.release(bad)
    assert bobs.is_dir()
    store.release("br-alice")
    assert list((store.root / "br-alice").iterdir()) == [] and bobs.is_dir()
    store.clear()
    assert not store.root.exists()


# -- the job queue ----------------------------------------------------------------------------------------------- #


class FakeRun:
    """A training child as the queue sees it (``jobs.RunHandle``): the test sets ``state`` and the records, and
    reads what the queue asked of it."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.state = "running"
        self.error: str | None = None
        self.train_records: list[dict[str, Any]] = []
        self.tail = ""
        self.stops = 0
        self.killed_after: float | None = None
        self.record_reads = 0

    @property
    def done(self) -> bool:
        return self.state not in ("pending", "running")

    def records(self, *, kind: str | None = None) -> list[dict[str, Any]]:
        self.record_reads += 1
        return [record for record in self.train_records if kind is None or record.get("type") == kind]

    def stop(self, *, wait: bool = False, timeout: float | None = None) -> None:
        self.stops += 1

    def stop_then_kill(self, grace: float) -> str:
        # Asked to stop, killed after ``grace`` if it has not ended: like a real run, it ends when it ends.
        self.stops += 1
        self.killed_after = grace
        return self.state

    def wait(self, timeout: float | None = None) -> None:
        time.sleep(0.01)

    def log_tail(self, lines: int = 20) -> str:
        return self.tail


class FakeLauncher:
    def __init__(self) -> None:
        self.runs: list[FakeRun] = []
        self.failure: Exception | None = None

    def __call__(self, config: TrainConfig) -> FakeRun:
        if self.failure is not None:
            raise self.failure
        run = FakeRun(config)
        self.runs.append(run)
        return run

    @property
    def started(self) -> list[str]:
        return [Path(run.config.output_dir).name for run in self.runs]


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def jobs(tmp_path: Path, launcher: FakeLauncher, monkeypatch: pytest.MonkeyPatch) -> Iterator[TrainingJobs]:
    monkeypatch.setattr(jobs_module, "SNAPSHOT_TTL_S", 0.0)  # every snapshot fresh, unless a test says otherwise
    monkeypatch.setattr(jobs_module, "WATCH_INTERVAL_S", 0.02)
    queue = TrainingJobs(tmp_path / "runs", launcher=launcher)
    yield queue
    queue.shutdown(0)


def submit(jobs: TrainingJobs, owner: Owner, *, token: str | None = None) -> tuple[Job, str]:
    config = TrainConfig(dataset=SHAPES, output_dir=str(jobs.new_run_dir(owner)))
    return jobs.submit(owner, config, description=DESCRIPTION, token=token)


def leave_a_checkpoint(run: FakeRun, *, state: str = "stopped", step: int = 2) -> None:
    """Write what a run that stopped (or finished) at ``step`` leaves behind, then end it."""
    directory = Path(run.config.output_dir)
    run.config.save(directory / TRAIN_CONFIG)
    save_checkpoint(directory / CHECKPOINTS, step=step, epoch=0, model=torch.nn.Linear(2, 2), train_state={"n": step})
    write_status(directory, state=state, step=step, total_steps=10)
    run.state = state


def test_one_job_trains_at_a_time_and_the_others_wait_in_order(jobs: TrainingJobs, launcher: FakeLauncher) -> None:
    a, _ = submit(jobs, ALICE)
    b, _ = submit(jobs, BOB)
    c, _ = submit(jobs, CAROL)
    assert launcher.started == [a.name]
    assert [(jobs.snapshot(job).state, jobs.snapshot(job).place_in_line) for job in (a, b, c)] == [
        ("running", 0),
        ("queued", 1),
        ("queued", 2),
    ]
    assert jobs.latest_job(BOB) is b and jobs.latest_job(MALLORY) is None
    assert jobs.active_datasets() == [Path(SHAPES)] * 3
    time.sleep(0.1)  # the watcher looks several times meanwhile: nothing else starts while one trains
    assert launcher.started == [a.name]

    launcher.runs[0].state = "finished"
    wait_until(lambda: len(launcher.runs) == 2)
    assert launcher.started == [a.name, b.name]
    assert jobs.snapshot(b).state == "running" and jobs.snapshot(c).place_in_line == 1
    launcher.runs[1].state = "failed"  # a failed job frees the trainer too
    wait_until(lambda: len(launcher.runs) == 3)
    assert launcher.started == [a.name, b.name, c.name] and jobs.snapshot(c).place_in_line == 0


def test_each_owner_has_at_most_one_job_waiting(jobs: TrainingJobs, launcher: FakeLauncher) -> None:
    a, _ = submit(jobs, ALICE)  # trains
    waiting, _ = submit(jobs, ALICE)  # waits
    with pytest.raises(JobBusyError, match="already have a job waiting"):
        submit(jobs, ALICE)
    assert sorted(p.name for p in (jobs.runs_root / ALICE.key).iterdir()) == sorted([a.name, waiting.name])
    bobs, _ = submit(jobs, BOB)  # others still queue
    assert jobs.snapshot(bobs).place_in_line == 2 and launcher.started == [a.name]


def test_stopping_a_waiting_job_removes_it_and_its_folder(jobs: TrainingJobs, launcher: FakeLauncher) -> None:
    a, _ = submit(jobs, ALICE)
    b, token_b = submit(jobs, BOB)
    c, _ = submit(jobs, CAROL)
    assert (b.directory / JOB_FILE).is_file()
    assert jobs.stop(BOB, None) == b.name
    assert not b.directory.exists() and jobs.snapshot(c).place_in_line == 1
    assert launcher.runs[0].stops == 0  # the training job was not touched
    assert jobs.stop(BOB, None) is None
    with pytest.raises(NotYourJobError):
        jobs.stop(None, token_b)  # its token controls nothing any more
    launcher.runs[0].state = "finished"
    wait_until(lambda: len(launcher.runs) == 2)
    assert launcher.started == [a.name, c.name]


def test_strangers_cannot_stop_anothers_job_the_token_holder_owner_and_admin_can(
    jobs: TrainingJobs, launcher: FakeLauncher
) -> None:
    a, token = submit(jobs, ALICE)
    run = launcher.runs[0]
    assert jobs.stop(MALLORY, None) is None  # nothing of theirs to stop
    near_miss = token[:-1] + ("A" if token[-1] != "A" else "B")
    stored = json.loads((a.directory / JOB_FILE).read_text())["token_sha256"]
    for wrong in ("not-the-token", near_miss, stored):  # stored: what job.json holds controls nothing
        with pytest.raises(NotYourJobError):
            jobs.stop(MALLORY, wrong)
        with pytest.raises(NotYourJobError):
            jobs.stop(None, wrong)
    assert run.stops == 0 and jobs.snapshot(a).state == "running"

    assert jobs.stop(None, token) == a.name  # the token's holder (an API client)
    wait_until(lambda: run.stops == 1)  # asked from a thread, which kills the run if it outlives the grace
    assert run.killed_after == jobs_module.STOP_GRACE_S
    assert jobs.stop(ALICE, None) == a.name  # its owner, by login (already stopping: asked once)
    assert jobs.stop(MALLORY, None, admin=True) == a.name  # the admin
    assert run.stops == 1
    run.state = "stopped"
    wait_until(lambda: not jobs.snapshot(a).active)
    assert jobs.stop(None, None, admin=True) is None


def test_job_file_holds_the_tokens_hash_never_the_token(jobs: TrainingJobs) -> None:
    a, token = submit(jobs, ALICE)
    chosen = "a-token-the-caller-chose-0123456789abcdef"
    b, returned = submit(jobs, BOB, token=chosen)
    assert returned == chosen
    record = json.loads((a.directory / JOB_FILE).read_text())
    assert record["owner"] == ALICE.key and record["description"] == DESCRIPTION
    assert re.fullmatch(r"[0-9a-f]{64}", record["token_sha256"])
    assert token_matches(token, record["token_sha256"]) and not token_matches(chosen, record["token_sha256"])
    assert token_matches(chosen, json.loads((b.directory / JOB_FILE).read_text())["token_sha256"])
    for path in everything(jobs.runs_root):
        assert token not in str(path) and chosen not in str(path)
        if path.is_file():
            assert token.encode() not in path.read_bytes() and chosen.encode() not in path.read_bytes(), path


def test_only_the_owner_or_the_token_holder_resumes_a_run(jobs: TrainingJobs, launcher: FakeLauncher) -> None:
    a, token = submit(jobs, ALICE)
    leave_a_checkpoint(launcher.runs[0])
    wait_until(lambda: not jobs.snapshot(a).active)
    assert jobs.resumable_runs(ALICE.key) == [a.name] and jobs.resumable_runs(MALLORY.key) == []
    stored = json.loads((a.directory / JOB_FILE).read_text())["token_sha256"]
    for owner, wrong in ((MALLORY, None), (MALLORY, "guess"), (None, stored), (None, None)):
        with pytest.raises(NotYourJobError):
            jobs.resume(a.name, owner, wrong)
    with pytest.raises(ValueError, match="not a run name"):
        jobs.resume("../" + a.name, ALICE, None)
    assert len(launcher.runs) == 1

    resumed = jobs.resume(a.name, None, token)  # the API client holding the token
    assert resumed.name == a.name and len(launcher.runs) == 2
    config = launcher.runs[1].config
    assert config.resume and config.output_dir == str(a.directory) and config.dataset == SHAPES
    assert jobs.resumable_runs(ALICE.key) == []  # not while it trains
    with pytest.raises(JobBusyError):
        jobs.resume(a.name, ALICE, None)

    leave_a_checkpoint(launcher.runs[1], step=4)
    wait_until(lambda: not jobs.snapshot(resumed).active)
    assert jobs.resume(a.name, ALICE, None).name == a.name  # its owner by login, without the token
    leave_a_checkpoint(launcher.runs[2], step=6)
    wait_until(lambda: not jobs.snapshot(jobs.job(a.name)).active)

    # After a restart, job.json still says whose it is.
    restarted = TrainingJobs(jobs.runs_root, launcher=launcher)
    try:
        assert restarted.resumable_runs(ALICE.key) == [a.name]
        with pytest.raises(NotYourJobError):
            restarted.resume(a.name, MALLORY, "guess")
        assert restarted.resume(a.name, None, token).name == a.name and len(launcher.runs) == 4
    finally:
        restarted.shutdown(0)


def test_stopping_a_waiting_resumed_run_keeps_its_checkpoints(jobs: TrainingJobs, launcher: FakeLauncher) -> None:
    a, _ = submit(jobs, ALICE)
    leave_a_checkpoint(launcher.runs[0])
    wait_until(lambda: not jobs.snapshot(a).active)
    submit(jobs, BOB)  # trains now
    waiting = jobs.resume(a.name, ALICE, None)
    assert jobs.snapshot(waiting).place_in_line == 1
    assert jobs.stop(ALICE, None) == a.name
    checkpoint = latest_checkpoint(a.directory / CHECKPOINTS)
    assert (a.directory / TRAIN_CONFIG).is_file() and checkpoint is not None and checkpoint.step == 2
    assert jobs.resumable_runs(ALICE.key) == [a.name]


def make_run(
    root: Path,
    owner: Owner,
    name: str,
    *,
    state: str | None = None,
    checkpoint: bool = False,
    model: tuple[str, ...] = (),
    config: bool = True,
) -> None:
    directory = root / owner.key / name
    directory.mkdir(parents=True)
    if config:
        TrainConfig(dataset=SHAPES, output_dir=str(directory)).save(directory / TRAIN_CONFIG)
    if checkpoint:
        save_checkpoint(directory / CHECKPOINTS, step=3, epoch=0, model=torch.nn.Linear(2, 2), train_state={})
    if state is not None:
        write_status(directory, state=state, step=3, total_steps=3)
    for file in model:
        (directory / MODEL_DIR).mkdir(exist_ok=True)
        (directory / MODEL_DIR / file).write_bytes(b"{}")


def test_resumable_runs_and_finished_models_list_only_the_owners(jobs: TrainingJobs) -> None:
    root = jobs.runs_root
    weights = ("config.json", "model.safetensors")
    make_run(root, ALICE, "20240101-000000-aaaaaaaa", state="stopped", checkpoint=True)
    make_run(root, ALICE, "20240102-000000-bbbbbbbb", state="finished", checkpoint=True, model=weights)
    make_run(root, ALICE, "20240103-000000-cccccccc", state="failed", checkpoint=True)
    make_run(root, ALICE, "20240104-000000-dddddddd", state="stopped")  # no checkpoint to continue from
    make_run(root, ALICE, "20240105-000000-eeeeeeee", checkpoint=True)  # no status: the child was killed
    make_run(root, ALICE, "20240106-000000-ffffffff", state="finished", model=("config.json",))  # export unfinished
    make_run(root, ALICE, "20240107-000000-abababab", state="stopped", checkpoint=True, config=False)  # not a run
    make_run(root, BOB, "20240108-000000-babababa", state="stopped", checkpoint=True, model=weights)
    assert jobs.resumable_runs(ALICE.key) == [
        "20240105-000000-eeeeeeee",
        "20240103-000000-cccccccc",
        "20240101-000000-aaaaaaaa",
    ]
    assert jobs.finished_models(ALICE.key) == [
        ("20240102-000000-bbbbbbbb", root / ALICE.key / "20240102-000000-bbbbbbbb" / MODEL_DIR)
    ]
    assert jobs.resumable_runs(BOB.key) == ["20240108-000000-babababa"]
    assert [name for name, _ in jobs.finished_models(BOB.key)] == ["20240108-000000-babababa"]
    for stranger in (MALLORY.key, None, "", ".", "..", f"../{ALICE.key}", f"{ALICE.key}/..", f"x/../{ALICE.key}"):
        assert jobs.resumable_runs(stranger) == [] and jobs.finished_models(stranger) == [], stranger


def test_the_public_summary_tells_progress_and_nothing_else(jobs: TrainingJobs, launcher: FakeLauncher) -> None:
    idle = {"busy": False, "state": "idle", "step": 0, "total_steps": 0, "eta_seconds": None, "waiting": 0}
    assert jobs.public_summary() == idle
    a, token = submit(jobs, ALICE)
    b, _ = submit(jobs, BOB)
    write_status(a.directory, state="running", step=3, total_steps=10)
    launcher.runs[0].train_records = [{"type": "train", "step": 3, "steps_per_second": 2.0, "loss": 1.25}]
    summary = jobs.public_summary()
    assert summary == {"busy": True, "state": "running", "step": 3, "total_steps": 10, "eta_seconds": 3.5, "waiting": 1}
    text = json.dumps(summary)
    for private in (a.name, b.name, ALICE.key, BOB.key, "alice", token, DESCRIPTION, "1.25", str(jobs.runs_root)):
        assert private not in text
    launcher.runs[0].state = "finished"
    wait_until(lambda: jobs.public_summary()["waiting"] == 0)
    assert jobs.public_summary()["busy"] is True  # b trains now
    launcher.runs[1].state = "stopped"
    wait_until(lambda: jobs.public_summary() == idle)


def test_a_launcher_that_raises_fails_the_job_and_the_queue_keeps_working(
    jobs: TrainingJobs, launcher: FakeLauncher
) -> None:
    launcher.failure = RuntimeError("out of memory starting the child")
    a, _ = submit(jobs, ALICE)
    failed = jobs.snapshot(a)
    assert failed.state == "failed" and "RuntimeError: out of memory starting the child" in failed.message
    assert not failed.active and not jobs.public_summary()["busy"] and jobs.active_datasets() == []

    launcher.failure = None
    b, _ = submit(jobs, BOB)
    assert launcher.started == [b.name] and jobs.snapshot(b).state == "running"
    launcher.failure = OSError("fork failed")
    c, _ = submit(jobs, CAROL)  # waits; the watcher will fail to start it
    launcher.runs[0].state = "finished"
    wait_until(lambda: jobs.snapshot(c).state == "failed")
    assert "OSError: fork failed" in jobs.snapshot(c).message

    launcher.failure = None
    d, _ = submit(jobs, ALICE)
    e, _ = submit(jobs, BOB)
    assert launcher.started == [b.name, d.name]
    run = launcher.runs[1]
    run.state, run.error, run.tail = "failed", "the training process was killed (signal 9)", "MemoryError\n"
    wait_until(lambda: launcher.started == [b.name, d.name, e.name])  # the watcher still starts the next
    message = jobs.snapshot(d).message
    assert "killed (signal 9)" in message and "MemoryError" in message


def test_shutdown_drops_the_waiting_jobs_and_stops_the_training_one(jobs: TrainingJobs, launcher: FakeLauncher) -> None:
    a, _ = submit(jobs, ALICE)
    b, _ = submit(jobs, BOB)
    c, _ = submit(jobs, CAROL)
    jobs.shutdown(grace=7.5)
    assert launcher.runs[0].killed_after == 7.5
    assert a.directory.exists() and not b.directory.exists() and not c.directory.exists()
    assert jobs.public_summary()["waiting"] == 0
    with pytest.raises(JobBusyError, match="shutting down"):
        submit(jobs, BOB)
    time.sleep(0.1)
    assert launcher.started == [a.name]


def test_snapshots_are_cached_for_the_ttl(
    jobs: TrainingJobs, launcher: FakeLauncher, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = submit(jobs, ALICE)
    b, _ = submit(jobs, BOB)
    run = launcher.runs[0]
    now = [1000.0]
    clock = SimpleNamespace(monotonic=lambda: now[0], strftime=time.strftime, sleep=time.sleep)
    monkeypatch.setattr(jobs_module, "time", clock)
    monkeypatch.setattr(jobs_module, "SNAPSHOT_TTL_S", 1.0)
    first = jobs.snapshot(a)
    reads = run.record_reads
    run.train_records = [{"type": "train", "step": 5, "steps_per_second": 1.0}]
    now[0] += 0.9
    for _ in range(50):  # any number of polling pages: one read per interval
        assert jobs.snapshot(a) is first
    assert run.record_reads == reads and first.step == 0
    now[0] += 0.2
    assert jobs.snapshot(a).step == 5 and run.record_reads == reads + 1

    assert jobs.snapshot(b).state == "queued"  # cached, and time stands still from here on
    run.state = "finished"
    wait_until(lambda: len(launcher.runs) == 2)
    assert jobs.snapshot(b).state == "running"  # a job that starts is not shown from its stale snapshot


# -- the Fine-tune tab ------------------------------------------------------------------------------------------- #


def form(**overrides: Any) -> list[Any]:
    values = {"kind": "shapes", "shapes_train": 16, "shapes_validation": 4, "shapes_size": 128}
    values.update({"hub_id": "", "folder": "", "upload": None, **overrides})
    return [
        values[k] for k in ("kind", "shapes_train", "shapes_validation", "shapes_size", "hub_id", "folder", "upload")
    ]


def coco_zip(path: Path, shade: int = 0) -> Path:
    """Six 96x64 images with one box each, as COCO under ``set/`` (``shade`` makes a different zip)."""
    images, annotations = [], []
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(6):
            image = PIL.Image.new("RGB", (96, 64), (240, 240, 240 - shade))
            image.paste((200, 20, 20), (10 + index, 10, 40 + index, 40))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            archive.writestr(f"set/images/{index}.png", buffer.getvalue())
            images.append({"id": index, "file_name": f"{index}.png", "width": 96, "height": 64})
            annotations.append({"id": index, "image_id": index, "category_id": 7, "bbox": [10 + index, 10, 30, 30]})
        coco = {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "block"}]}
        archive.writestr("set/annotations.json", json.dumps(coco))
    return path


@pytest.fixture
def tab(tmp_path: Path, launcher: FakeLauncher) -> Iterator[FinetuneTab]:
    """The tab as the app builds it, its jobs started by the fake launcher."""
    paths = AppPaths.from_root(tmp_path, work=tmp_path / "work")
    jobs = TrainingJobs(paths.runs, launcher=launcher)
    registry = ModelRegistry(paths.models, hub_reachable=lambda: False, finetuned=jobs.finished_models)
    services = FinetuneServices(
        paths=paths,
        jobs=jobs,
        registry=registry,
        downloads=DownloadFolder(paths.scratch("models")),
        identities=Identities(Visitors(paths.labels)),
        uploads=UploadStore(paths.scratch("uploads")),
        previews=CheckpointPreviews(),
    )
    yield FinetuneTab(services)
    jobs.shutdown(0)


def test_release_session_deletes_the_pages_uploads_except_those_a_job_trains_on(
    tab: FinetuneTab, launcher: FakeLauncher, tmp_path: Path
) -> None:
    visitor, _ = tab.identities.visitors.claim(None)
    neighbour, _ = tab.identities.visitors.claim(None)
    uploads = tab.services.uploads.root
    mine = uploads / str(tab.identities.owner_key(visitor))
    first, second = coco_zip(tmp_path / "first.zip"), coco_zip(tmp_path / "second.zip", shade=9)
    tab.check_dataset(*form(kind="upload", upload=str(second)), neighbour, request=page("neighbour"))
    neighbours = files(uploads / str(tab.identities.owner_key(neighbour)))
    assert neighbours

    tab.check_dataset(*form(kind="upload", upload=str(first)), visitor, request=page("page-1"))
    assert len(list(mine.iterdir())) == 1
    tab.release_session(page("page-without-uploads"))
    assert len(list(mine.iterdir())) == 1
    tab.release_session(page("page-1"))
    assert list(mine.iterdir()) == []

    settings = ["preset:tiny", 1, 0, 4, 2e-4, 0, 1, 2]  # base model, epochs, max steps, batch, lr, size, eval, save
    started = tab.start(*form(kind="upload", upload=str(first)), *settings, visitor, request=page("page-2"))
    assert started["place_in_line"] == 0 and len(launcher.runs) == 1
    trained_on = Path(launcher.runs[0].config.dataset)
    assert trained_on.is_relative_to(mine) and (trained_on / "annotations.json").is_file()
    tab.check_dataset(*form(kind="upload", upload=str(second)), visitor, request=page("page-2"))
    assert len(list(mine.iterdir())) == 2
    tab.release_session(page("page-2"))
    assert trained_on.is_dir() and len(list(mine.iterdir())) == 1  # the one the job trains on stays

    launcher.runs[0].state = "finished"
    wait_until(lambda: not tab.jobs.snapshot(tab.jobs.job(started["run"])).active)
    tab.check_dataset(*form(kind="upload", upload=str(second)), visitor, request=page("page-3"))
    tab.release_session(page("page-3"))  # the owner's next page that closes takes it with it
    assert list(mine.iterdir()) == []
    assert files(uploads / str(tab.identities.owner_key(neighbour))) == neighbours  # never touched


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 48), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def saved_dataset_naming(folder: Path, reference: str, *, decode: bool) -> None:
    """A ``save_to_disk`` folder of two rows, the second's image cell only the path ``reference``.

    save_to_disk embeds the bytes of the files its cells name, so the Arrow file is rewritten afterwards with the
    path-only cell in it, as a crafted upload would hold it."""
    box = datasets.List(datasets.List(datasets.Value("float32"), length=4))
    objects = {"bbox": box, "category": datasets.List(datasets.ClassLabel(names=["circle", "square"]))}
    features = datasets.Features({"image": datasets.Image(decode=decode), "objects": objects})

    def rows(images: list[dict[str, Any]]) -> datasets.Dataset:
        boxes = [{"bbox": [[4.0 + n, 4.0, 20.0, 16.0]], "category": [n % 2]} for n in range(len(images))]
        return datasets.Dataset.from_dict({"image": images, "objects": boxes}, features=features)

    inline = {"bytes": png_bytes((20, 160, 90)), "path": None}
    rows([inline]).save_to_disk(str(folder))
    (arrow,) = folder.glob("*.arrow")
    table = rows([inline, {"bytes": None, "path": reference}]).data.table
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


@pytest.mark.parametrize("decode", [True, False], ids=["decoded", "decode-false"])
@pytest.mark.parametrize("spelling", ["absolute", "relative"])
def test_an_uploaded_hf_dataset_naming_a_file_outside_is_refused_unread_and_deleted(
    tab: FinetuneTab, tmp_path: Path, opened: Any, decode: bool, spelling: str
) -> None:
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png_bytes((200, 30, 60)))
    visitor, _ = tab.identities.visitors.claim(None)
    owner_folder = tab.services.uploads.root / str(tab.identities.owner_key(visitor))
    # An upload lands in <owner>/<upload>/content/set: the relative spelling climbs out of exactly that.
    unpacked = owner_folder / "upload" / "content" / "set"
    reference = str(secret) if spelling == "absolute" else os.path.relpath(secret, unpacked)
    crafted = tmp_path / "crafted" / "set"
    saved_dataset_naming(crafted, reference, decode=decode)
    archive = tmp_path / "crafted.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(crafted.rglob("*")):
            zipped.write(path, path.relative_to(crafted.parent).as_posix())
    opened.clear()

    with pytest.raises(gr.Error) as refused:
        tab.check_dataset(*form(kind="upload", upload=str(archive)), visitor, request=page("page"))
    message = str(refused.value)
    assert "outside the dataset folder" in message and "must keep all its files inside" in message, message
    assert "--allow-outside-files" not in message  # the server never allows it: no advice a visitor cannot follow
    assert str(tmp_path) not in message  # no server paths in what the visitor sees
    assert opened.within(secret.parent) == []
    assert opened, "the recorder saw nothing at all"  # the check did open the upload's own files
    assert files(tab.services.uploads.root) == []  # the refused upload is deleted

    with open(secret, "rb"):  # the recorder is live: what is opened here, it sees
        pass
    assert opened.within(secret.parent) == [str(secret)]


def test_the_line_is_capped_over_all_owners(jobs: TrainingJobs) -> None:
    # API clients are a new owner per job: without a cap over everyone the line would grow without end.
    submit(jobs, ALICE)  # trains
    for index in range(jobs_module.MAX_WAITING):
        submit(jobs, owner_of_login(f"visitor-{index}"))
    with pytest.raises(JobBusyError, match="jobs are waiting to train, the most this server takes"):
        submit(jobs, owner_of_login("one-too-many"))


def test_the_admin_stops_their_own_waiting_job_before_anyone_elses(jobs: TrainingJobs, launcher: FakeLauncher) -> None:
    bobs, _ = submit(jobs, BOB)  # trains
    authors, _ = submit(jobs, ALICE)  # waits
    assert jobs.stop(ALICE, None, admin=True) == authors.name  # the admin's own first
    assert launcher.runs[0].stops == 0
    assert jobs.stop(ALICE, None, admin=True) == bobs.name  # then, with none of their own, the training one
    wait_until(lambda: launcher.runs[0].stops == 1)


def test_stop_asks_a_run_once_however_often_it_is_pressed(jobs: TrainingJobs, launcher: FakeLauncher) -> None:
    job, token = submit(jobs, ALICE)
    for _ in range(50):
        assert jobs.stop(None, token) == job.name
    wait_until(lambda: launcher.runs[0].stops == 1)
    time.sleep(0.1)
    assert launcher.runs[0].stops == 1  # one stop thread, not fifty
