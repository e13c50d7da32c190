"""`make image-check`: build the container image and check it the way the docs run it.

Stages (each printed as it starts):
 1. a container engine: `docker info`, else (as root) start Debian's `dockerd`; with
    neither, say so and exit 0 (skipped);
 2. the base: the Dockerfile's own (python:3.11-slim with PyTorch's CPU wheels) when
    Docker Hub and download.pytorch.org answer; else an equivalent base built from
    Debian's packages with debootstrap (Python, its headers, g++, Debian's CPU builds of
    torch and torchvision) and imported into the engine, once;
 3. the build: batchd's other dependencies come from this machine's own pip settings
    (index, CA), downloaded here and served to the build over 127.0.0.1, so that no
    credential or certificate goes into the build;
 4. the `docker run` of docs/deployment.md (read-only root, executable tmpfs cache, stop
    timeout):
    /ready, a held-out digit predicted and its label checked, ONNX Runtime timed on
    every bucket at warm-up (the image has the onnx extra), /metrics, the engine's
    health status; then `docker stop` under load: every request sent before the stop is
    answered (200, or 503 `shutdown`), and the exit code is 0;
 5. start-up time with a cold and with a warm compile cache (a named volume), and the
    image's size.

    python -m loadtest.image_check            # or: make image-check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx

from loadtest.servers import ROOT, free_port

IMAGE = "batchd:check"
DEBIAN_BASE = "batchd-base:trixie-torch2.6"
DEBIAN_SUITE = "trixie"  # its python3-torch (2.6) and python3-torchvision (0.21) fit our pins
# libtorch-dev: the C++ headers inductor compiles against (python3-torch lacks them)
DEBIAN_PACKAGES = ["python3", "python3-dev", "python3-pip", "g++", "python3-torch",
                   "libtorch-dev", "python3-torchvision", "python3-numpy", "python3-pil",
                   "ca-certificates"]
CACHE_VOLUME = "batchd-check-inductor"
STOP_TIMEOUT_S = 45  # drain_timeout_s (30) + exit + margin, as in docs/deployment.md and k8s


def stage(message: str) -> None:
    print(f"[image-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def docker(*args: str, check: bool = True, capture: bool = True,
           timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], check=check, text=True, timeout=timeout,
                          capture_output=capture)


# -- 1. the engine -----------------------------------------------------------------------


def engine_running() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return docker("info", check=False, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ensure_engine() -> bool:
    if engine_running():
        return True
    dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd"
                                          if Path("/usr/sbin/dockerd").exists() else None)
    if dockerd is None or os.geteuid() != 0:
        return False
    # No iptables: a sandbox may not allow it, and published ports go through docker's
    # userland proxy without it. overlay2 where the kernel allows it; else vfs (it copies
    # every layer: slower, not wrong).
    for driver in ("overlay2", "vfs"):
        log = Path(tempfile.gettempdir()) / f"batchd-dockerd-{driver}.log"
        stage(f"starting dockerd with {driver} (log: {log})")
        daemon = subprocess.Popen([dockerd, "--iptables=false", f"--storage-driver={driver}"],
                                  stdout=log.open("w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and daemon.poll() is None:
            if engine_running():
                return True
            time.sleep(1)
        if daemon.poll() is None:
            daemon.terminate()
            daemon.wait(timeout=30)
    return False


# -- 2. the base -------------------------------------------------------------------------


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=8):
            return True
    except Exception:
        return False


def usual_base_available() -> bool:
    if not reachable("https://download.pytorch.org/whl/cpu/torch/"):
        return False
    return docker("pull", "python:3.11-slim-bookworm", check=False,
                  timeout=600).returncode == 0


def debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    return "http://deb.debian.org/debian"


def ensure_debian_base() -> str:
    if docker("image", "inspect", DEBIAN_BASE, check=False).returncode == 0:
        stage(f"base {DEBIAN_BASE} is already in the engine")
        return DEBIAN_BASE
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is not installed (Debian package debootstrap)")
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory(prefix="batchd-base-", dir="/var/tmp") as root:
        stage(f"building {DEBIAN_BASE} with debootstrap ({DEBIAN_SUITE}, {mirror}); "
              "a few minutes")
        subprocess.run(["debootstrap", "--variant=minbase",
                        f"--include={','.join(DEBIAN_PACKAGES)}", DEBIAN_SUITE, root,
                        mirror], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", f"{root}/var/cache/apt/archives",
                        f"{root}/var/lib/apt/lists"], check=True)
        stage(f"importing {DEBIAN_BASE} into the engine")
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "--change",
                        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "--change", 'CMD ["/bin/bash"]', "-", DEBIAN_BASE],
                       stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
        tar.wait()
    return DEBIAN_BASE


# -- 3. the build ------------------------------------------------------------------------


def project_requirements(skip: set[str]) -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [*pyproject["build-system"]["requires"], "wheel"]
    # the image installs the onnx extra too (see the Dockerfile)
    for requirement in [*pyproject["project"]["dependencies"],
                        *pyproject["project"]["optional-dependencies"]["onnx"]]:
        name = requirement.split(";")[0].split(">")[0].split("<")[0].split("=")[0].strip()
        if name.lower() not in skip:
            wanted.append(requirement)
    return wanted


def download_wheels(folder: Path, python_version: str, torch_version: str) -> None:
    """The dependencies the base lacks, as wheels for its Python and its torch, through
    this machine's own pip configuration (its index, mirror and CA)."""
    folder.mkdir(parents=True, exist_ok=True)
    requirements = project_requirements(skip={"torch", "torchvision"})
    if torch_version.startswith("2.6."):
        # torch 2.6's ONNX exporter fails on a BatchNorm with onnxscript 0.3 and later
        # (0.3.2, 0.4.0, 0.5.4, 0.6.2 and 0.7.2 tried in this image; 0.2.7 exports
        # the digits model)
        requirements.append("onnxscript<0.3")
    platforms = [arg for tag in ("manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                 "manylinux_2_28_x86_64", "manylinux_2_5_x86_64",
                                 "manylinux1_x86_64", "any")
                 for arg in ("--platform", tag)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--dest",
                    str(folder), "--only-binary=:all:", "--python-version", python_version,
                    "--implementation", "cp", *platforms, *requirements], check=True)


@contextlib.contextmanager
def serving_folder(folder: Path) -> Iterator[str]:
    """The folder over plain HTTP on 127.0.0.1 (pip's --find-links takes the listing)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                                "127.0.0.1", "--directory", str(folder)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 10
        while not reachable(url) and time.monotonic() < deadline:
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait()


def build(base: str, torch_source: str, pip_args: str) -> float:
    stage(f"docker build -t {IMAGE} (base {base}, torch from {torch_source})")
    started = time.monotonic()
    command = ["build", "--network", "host", "-t", IMAGE, "--build-arg",
               f"BASE_IMAGE={base}", "--build-arg", f"TORCH_SOURCE={torch_source}"]
    if pip_args:
        command += ["--build-arg", f"PIP_ARGS={pip_args}"]
    result = docker(*command, str(ROOT), check=False, capture=False)
    if result.returncode != 0:
        raise SystemExit(f"docker build failed (exit {result.returncode})")
    return time.monotonic() - started


# -- 4 and 5. running it ---------------------------------------------------------------


def run_command(port: int, cache: str) -> list[str]:
    """The `docker run` of docs/deployment.md, detached, on `port`: a read-only root; the
    compile cache on an executable tmpfs (cache="tmpfs") or a named volume."""
    mount = (["--tmpfs", "/home/batchd/.cache:rw,exec,uid=10001,gid=10001"]
             if cache == "tmpfs" else ["-v", f"{cache}:/home/batchd/.cache"])
    return ["run", "-d", "-p", f"127.0.0.1:{port}:8000", "--stop-timeout",
            str(STOP_TIMEOUT_S), "--read-only", "--tmpfs", "/tmp:rw,exec", *mount, IMAGE]


def start(cache: str) -> tuple[str, str, float]:
    port = free_port()
    started = time.monotonic()
    container = docker(*run_command(port, cache)).stdout.strip()
    url = f"http://127.0.0.1:{port}"
    deadline = started + 600
    while time.monotonic() < deadline:
        state = json.loads(docker("inspect", container).stdout)[0]["State"]
        if not state["Running"]:
            logs = docker("logs", container, check=False)
            logs_tail = (logs.stdout + logs.stderr)[-3000:]
            raise SystemExit(f"the container exited ({state['ExitCode']}) at start-up:\n"
                             f"{logs_tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return container, url, time.monotonic() - started
        time.sleep(0.5)
    raise SystemExit("the container was not ready within 600 s")


def held_out_png() -> tuple[bytes, int]:
    """The first held-out digit as PNG bytes, and its label."""
    import io

    from batchd.digits import digit_images

    images, labels = digit_images("held_out")
    buffer = io.BytesIO()
    images[0].save(buffer, format="PNG")
    return buffer.getvalue(), labels[0]


def check_serving(container: str, url: str) -> None:
    body, expected = held_out_png()
    response = httpx.post(f"{url}/predict", content=body,
                          headers={"Content-Type": "image/png"}, timeout=30)
    assert response.status_code == 200, response.text
    label = response.json()["predictions"][0]["label"]
    assert label == str(expected), (label, expected)
    stage(f"predicted a held-out {expected}: {label}")
    logs = docker("logs", container, check=False)
    timed = re.findall(r"warmed bucket .*\(ms a batch: ([^)]*)\)", logs.stdout + logs.stderr)
    assert timed and all(re.search(r"\bonnx \d", line) for line in timed), timed
    stage(f"ONNX Runtime timed on every bucket ({timed[0]} at the first)")
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    success = [line for line in metrics.splitlines()
               if line.startswith("batchd_requests_total{") and 'outcome="success"' in line]
    assert success and float(success[0].split()[-1]) >= 1, success
    stage("/metrics answers with batchd's series")
    deadline = time.monotonic() + 60
    health = ""
    while time.monotonic() < deadline:
        health = json.loads(docker("inspect", container).stdout)[0]["State"].get(
            "Health", {}).get("Status", "")
        if health == "healthy":
            break
        time.sleep(1)
    assert health == "healthy", f"health status {health!r}"
    stage("the engine reports it healthy")


def stop_under_load(container: str, url: str, clients: int = 8) -> None:
    body, _ = held_out_png()
    stop_at: list[float] = []
    outcomes: list[tuple[float, str]] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=120) as session:
            while True:
                sent = time.monotonic()
                try:
                    response = session.post(f"{url}/predict", content=body,
                                            headers={"Content-Type": "image/png"})
                    outcome = str(response.status_code)
                    if response.status_code == 503:
                        outcome += ":" + response.json().get("reason", "")
                except httpx.HTTPError as error:
                    outcome = f"transport:{type(error).__name__}"
                with lock:
                    outcomes.append((sent, outcome))
                if stop_at and sent > stop_at[0]:
                    return

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    stop_at.append(time.monotonic())
    stage(f"docker stop under load ({clients} clients)")
    docker("stop", container, timeout=STOP_TIMEOUT_S + 30)
    stopped_after = time.monotonic() - stop_at[0]
    for thread in threads:
        thread.join(timeout=60)
    state = json.loads(docker("inspect", container).stdout)[0]["State"]
    before = [outcome for sent, outcome in outcomes if sent < stop_at[0]]
    lost = [outcome for outcome in before if outcome not in ("200", "503:shutdown")]
    stage(f"stopped in {stopped_after:.2f} s, exit code {state['ExitCode']}; "
          f"{len(before)} requests sent before the stop: "
          f"{before.count('200')} answered 200, {before.count('503:shutdown')} 503, "
          f"{len(lost)} lost")
    docker("rm", container, check=False)
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert not lost, lost[:5]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-engine", action="store_true",
                        help="fail, rather than skip, where no engine can run")
    args = parser.parse_args(argv)
    stage("1/5 container engine")
    if not ensure_engine():
        message = "no container engine runs here (docker CLI, dockerd as root): skipped"
        if args.require_engine:
            raise SystemExit(message)
        stage(message)
        return
    stage("2/5 base image")
    if usual_base_available():
        base, torch_source, python_version = "python:3.11-slim-bookworm", "pip", "3.11"
    else:
        stage("Docker Hub or download.pytorch.org is out of reach: a Debian base instead")
        base, torch_source = ensure_debian_base(), "base"
        python_version, torch_version = docker(
            "run", "--rm", base, "python3", "-c",
            "import sys, torch; print('%d.%d' % sys.version_info[:2], torch.__version__)"
        ).stdout.split()
    stage("3/5 build")
    with tempfile.TemporaryDirectory(prefix="batchd-wheels-") as folder:
        pip_args = ""
        if torch_source == "base":
            download_wheels(Path(folder), python_version, torch_version)
            with serving_folder(Path(folder)) as index:
                pip_args = f"--no-index --find-links {index}"
                build_s = build(base, torch_source, pip_args)
        else:
            build_s = build(base, torch_source, pip_args)
    size_mb = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout) / 1e6
    stage(f"built in {build_s:.0f} s; image {size_mb:.0f} MB")
    stage("4/5 run as the docs do (read-only root, tmpfs cache)")
    container, url, cold_tmpfs_s = start("tmpfs")
    stage(f"ready after {cold_tmpfs_s:.1f} s (cold compile cache)")
    check_serving(container, url)
    stop_under_load(container, url)
    stage("5/5 start-up with the compile cache on a volume: cold, then warm")
    docker("volume", "rm", "-f", CACHE_VOLUME, check=False)
    container, url, cold_s = start(CACHE_VOLUME)
    docker("stop", container, timeout=STOP_TIMEOUT_S + 30)
    docker("rm", container, check=False)
    container, url, warm_s = start(CACHE_VOLUME)
    docker("stop", container, timeout=STOP_TIMEOUT_S + 30)
    docker("rm", container, check=False)
    docker("volume", "rm", "-f", CACHE_VOLUME, check=False)
    print(f"\n## image check\n\n| | |\n|---|---|\n| base | {base} |\n"
          f"| torch | {torch_source} |\n| image size | {size_mb:.0f} MB |\n"
          f"| build | {build_s:.0f} s |\n| start to ready, cold cache (tmpfs) | "
          f"{cold_tmpfs_s:.1f} s |\n| start to ready, cold cache (volume) | {cold_s:.1f} s |\n"
          f"| start to ready, warm cache (volume) | {warm_s:.1f} s |", flush=True)
    stage("passed")


if __name__ == "__main__":
    main()
