"""The production topology over loopback (docs/deploy.md): PostgreSQL behind the Prefect server and
the MLflow tracking server, MLflow's artifacts and the DVC remote in an S3-compatible store, the
nightly refresh deployed for two models to a process work pool with two workers.

``scripts/topology.sh`` starts the services (the same script docs/deploy.md gives users) and stops
them after the module. Where PostgreSQL's server is not installed the module is skipped with the
reason, unless NAS_REQUIRE_TOPOLOGY=1 (.ci/run sets it after installing PostgreSQL) makes that a
failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from nights import make_params, write_batch
from tiny import FACTS, fact

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 420.0  # a tiny night on a worker: imports, covariance and anchor on first use, the edit, DVC


def _have_postgres() -> bool:
    return shutil.which("pg_ctl") is not None or any(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    """``{VAR: value}`` of the running topology (scripts/topology.sh's env file)."""
    if not _have_postgres():
        if os.environ.get("NAS_REQUIRE_TOPOLOGY") == "1":
            pytest.fail("NAS_REQUIRE_TOPOLOGY=1 but PostgreSQL's server is not installed (apt-get install postgresql)")
        pytest.skip("PostgreSQL's server is not installed (apt-get install postgresql): no loopback topology")
    where = tmp_path_factory.mktemp("topology")
    script = ["bash", str(REPO / "scripts" / "topology.sh")]
    env = {**os.environ, "PYTHON_BIN": str(Path(sys.executable).parent)}
    t0 = time.perf_counter()
    subprocess.run([*script, "up", str(where)], check=True, env=env, timeout=300)
    print(f"topology up in {time.perf_counter() - t0:.1f} s")
    values = dict(line.split("=", 1) for line in (where / "env").read_text().splitlines() if "=" in line)
    try:
        yield values
    finally:
        subprocess.run([*script, "down", str(where)], env=env, timeout=120)


GIT_IDENTITY = {"GIT_AUTHOR_NAME": "nas", "GIT_AUTHOR_EMAIL": "nas@localhost", "GIT_COMMITTER_NAME": "nas",
                "GIT_COMMITTER_EMAIL": "nas@localhost"}


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=60,
                   env={**os.environ, **GIT_IDENTITY})


def _dvc(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env, check=True,
                          capture_output=True, text=True, timeout=300)


def model_project(root: Path, name: str, model_config: Path, tiny_folder: Path, topo: dict, env: dict,
                  sources: list[dict]) -> Path:
    """A model's project: a git + DVC repository whose default remote is s3://nas/dvc/NAME."""
    proj = root / name
    proj.mkdir()
    _git(proj, "init", "-q", "-b", "main")
    (proj / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    _dvc(proj, env, "init", "-q")
    _dvc(proj, env, "remote", "add", "-d", "store", f"s3://nas/dvc/{name}")
    _dvc(proj, env, "remote", "modify", "--local", "store", "endpointurl", topo["NAS_S3_ENDPOINT"])
    _git(proj, "add", ".")
    _git(proj, "commit", "-q", "-m", "project")
    params = make_params(tiny_folder, proj / "data", topo["MLFLOW_TRACKING_URI"], sources=sources,
                         lock={"prefect_slot": True, "wait_s": 5.0}, audit={"commit_pointers": True},
                         tracking={"experiment": f"refresh-{name}"})
    doc = yaml.safe_load(params.read_text(encoding="utf-8"))
    doc["model"] = str(model_config)
    # A model project apart from the checkout names the checkout's own data (shipped pilot facts, canary).
    doc["paths"].update(demo=str(REPO / "data" / "demo"), shared_data=str(REPO.parent / "shared" / "data"))
    params.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return params


def second_model(tiny_folder: Path) -> Path:
    """The tiny model under another name (its own registered model, slot and caches)."""
    folder = tiny_folder / "tiny-llama-b"
    if not folder.exists():
        shutil.copytree(tiny_folder / "tiny-llama", folder)
    cfg = yaml.safe_load((tiny_folder / "tiny.yaml").read_text(encoding="utf-8"))
    cfg["model"] = str(folder)
    path = tiny_folder / "tiny-b.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def start_worker(name: str, pool: str, env: dict, log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool,
                             "--type", "process", "--name", name], env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_workers(workers: list[subprocess.Popen], grace_s: float = 20.0) -> None:
    """SIGTERM each worker's process group, SIGKILL what is left after ``grace_s`` (a worker whose
    shutdown hangs must not outlive the test; its shutdown is not what the test checks)."""
    for w in workers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(w.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for w in workers:
        try:
            w.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(w.pid, signal.SIGKILL)
            w.wait(timeout=10)


def wait_final(client, run_id, timeout: float = RUN_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(1.0)
    raise AssertionError(f"flow run {run_id} not finished within {timeout} s (state {run.state})")


def pool_template(env: dict[str, str]) -> dict:
    """The process pool's default job template with ``env`` as its default environment."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["env"]["default"] = env
    return template


def wait_running(client, run_id, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.read_flow_run(run_id).state
        if state is not None and (state.is_running() or state.is_final()):
            return
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} did not start within {timeout} s")


def test_two_models_on_two_workers_with_postgres_s3_and_http_mlflow(topology, tiny_folder, tmp_path):
    import boto3
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.refresh.deploy import deploy
    from flows.tracking.names import registered_model_name
    from flows.tracking.tracker import Tracker

    t0 = time.perf_counter()
    env = {**os.environ, **topology, **GIT_IDENTITY, "PREFECT_WORKER_QUERY_SECONDS": "1", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the params file names the server: that is what is tested
    s3 = boto3.client("s3", endpoint_url=topology["NAS_S3_ENDPOINT"], aws_access_key_id=topology["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=topology["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    # Model a pulls from the S3 prefix, model b from a datasets folder.
    batch = write_batch(tmp_path / "upload" / "night-01.jsonl", [fact(*f) for f in FACTS[:2]])
    s3.put_object(Bucket="nas", Key="batches/model-a/night-01.jsonl", Body=batch.read_bytes())
    write_batch(tmp_path / "facts-b" / "train.jsonl", [fact(*f) for f in FACTS[2:4]])
    params_a = model_project(tmp_path, "model-a", tiny_folder / "tiny.yaml", tiny_folder, topology, env,
                             [{"name": "team-s3", "url": "s3://nas/batches/model-a/", "retry_delay_s": 1.0}])
    params_b = model_project(tmp_path, "model-b", second_model(tiny_folder), tiny_folder, topology, env,
                             [{"name": "team-ds", "url": str(tmp_path / "facts-b"), "kind": "datasets"}])
    workers = []
    with temporary_settings(updates={PREFECT_API_URL: topology["PREFECT_API_URL"]}):
        from prefect import get_client

        with get_client(sync_client=True) as client:  # an operator's pool, with an env of its own
            client.create_work_pool(WorkPoolCreate(name="nas-pool", type="process",
                                                   base_job_template=pool_template({"NAS_POOL_MARK": "kept"})))
        deploy(params_a, "nas-pool", "model-a", cron="0 2 * * *", project=params_a.parents[1])
        deploy(params_b, "nas-pool", "model-b", cron="30 2 * * *", timezone="Europe/Berlin",
               project=params_b.parents[1])
        try:
            for i in (1, 2):
                workers.append(start_worker(f"worker-{i}", "nas-pool", {**env, "PREFECT_HOME": str(tmp_path / f"w{i}")},
                                            tmp_path / f"worker-{i}.log"))
            run_a = run_deployment("nightly-refresh/model-a", timeout=0)
            run_b = run_deployment("nightly-refresh/model-b", timeout=0)
            with get_client(sync_client=True) as client:
                wait_running(client, run_a.id)
                overlap = run_deployment("nightly-refresh/model-a", timeout=0)  # while model a's night runs
                done_a, done_b, done_o = (wait_final(client, r.id) for r in (run_a, run_b, overlap))
                deployments = {d.name: d for d in client.read_deployments()}
        finally:
            stop_workers(workers)
    logs = "".join((tmp_path / f"worker-{i}.log").read_text() for i in (1, 2))
    assert done_a.state.is_completed(), (done_a.state, logs[-3000:])
    assert done_b.state.is_completed(), (done_b.state, logs[-3000:])
    assert done_o.state.is_cancelled(), done_o.state  # CANCEL_NEW: the overlapping run never edits
    assert {done_a.work_pool_name, done_b.work_pool_name} == {"nas-pool"}
    for run in (done_a, done_b):
        assert str(run.id) in logs  # picked up by one of the two workers
    assert deployments["model-b"].schedules[0].schedule.timezone == "Europe/Berlin"
    # nas deploy's flow retries reached the run on the worker (the engine copies them from the flow it loaded).
    retry = {"PREFECT_FLOWS_DEFAULT_RETRIES": "2", "PREFECT_FLOWS_DEFAULT_RETRY_DELAY_SECONDS": "600"}
    quiet = {"DASK_LOGGING__DISTRIBUTED": "warning"}  # Dask's INFO lines out of the night's log
    assert deployments["model-a"].job_variables["env"] == {**quiet, "NAS_POOL_MARK": "kept", **retry}  # the pool's kept
    assert (done_a.empirical_policy.retries, done_a.empirical_policy.retry_delay) == (2, 600)

    # MLflow over HTTP: both champions registered, their artifacts in the S3 store (via the proxy).
    for params, folder in ((params_a, "tiny-llama"), (params_b, "tiny-llama-b")):
        tracker = Tracker(topology["MLFLOW_TRACKING_URI"], f"refresh-{params.parents[1].name}")
        assert tracker.champion(registered_model_name(f"local--{folder}")) is not None
    artifacts = s3.list_objects_v2(Bucket="nas", Prefix="mlflow-artifacts/")
    assert artifacts["KeyCount"] > 0

    # The pull lines say where each batch came from (an ETag from S3, a fingerprint from datasets).
    pulls = {p.parents[1].name: [json.loads(x) for x in (p.parent / "ledger.jsonl").read_text().splitlines()
                                 if json.loads(x)["event"] == "pull"] for p in (params_a, params_b)}
    assert pulls["model-a"][0]["revision"].startswith("etag:")
    assert pulls["model-b"][0]["revision"].startswith("fingerprint:")

    # DVC: the night pushed to the S3 remote and committed its pointers (audit.commit_pointers);
    # a fresh clone pulls the same ledger from it.
    assert s3.list_objects_v2(Bucket="nas", Prefix="dvc/model-a/")["KeyCount"] > 0
    head = subprocess.run(["git", "log", "-1", "--format=%s"], cwd=params_a.parents[1], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert head == "DVC audit: champion v0001"
    clone = tmp_path / "clone-a"
    _git(tmp_path, "clone", "-q", str(params_a.parents[1]), str(clone))
    _dvc(clone, env, "remote", "modify", "--local", "store", "endpointurl", topology["NAS_S3_ENDPOINT"])
    _dvc(clone, env, "pull", "-q", "data/ledger.jsonl.dvc", "data/accepted.dvc")
    assert (clone / "data" / "ledger.jsonl").read_bytes() == (params_a.parent / "ledger.jsonl").read_bytes()
    assert [p.name for p in (clone / "data" / "accepted").iterdir()] == ["night-01.jsonl"]
    print(f"topology test body: {time.perf_counter() - t0:.1f} s")
