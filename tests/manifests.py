"""Checks packaging/kubernetes and packaging/container against what stacktap needs.

Usage: manifests.py STACKTAP_BINARY REPO

Beyond the Kubernetes schemas (kubernetes-validate, run by the caller): every container
runs as non-root with every capability dropped but the two a packet tap needs, has
resource limits and liveness/readiness on /healthz, passes only flags its subcommand
knows, and every stacktap.toml in the ConfigMap is a valid config. The Containerfile's
runtime stage runs as a numeric non-root user and grants the binary those two
capabilities only. Prints one line per problem; exits 1 if there is any.
"""

import pathlib
import re
import subprocess
import sys
import tempfile

import yaml

TAP_CAPS = {"NET_RAW", "NET_ADMIN"}


def flags_of(binary, sub):
    out = subprocess.run([binary, sub, "--help"], capture_output=True, text=True, check=True)
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))


def check_container(binary, name, pod, c, problems):
    where = f"{name}/{c['name']}"
    sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    if not sc.get("runAsNonRoot") or sc.get("runAsUser", 0) == 0:
        problems.append(f"{where}: not run as a non-root user")
    caps = sc.get("capabilities", {})
    if caps.get("drop") != ["ALL"]:
        problems.append(f"{where}: capabilities not dropped (drop: [ALL])")
    extra = set(caps.get("add", [])) - TAP_CAPS
    if extra:
        problems.append(f"{where}: capabilities beyond NET_RAW, NET_ADMIN: {sorted(extra)}")
    if caps.get("add") and c["args"][0] != "capture":
        problems.append(f"{where}: capabilities for something that does not capture")
    if not caps.get("add") and sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    if not sc.get("readOnlyRootFilesystem"):
        problems.append(f"{where}: root file system writable")
    limits = c.get("resources", {}).get("limits", {})
    if not {"cpu", "memory"} <= set(limits):
        problems.append(f"{where}: no cpu and memory limits")
    for probe in ("livenessProbe", "readinessProbe"):
        if c.get(probe, {}).get("httpGet", {}).get("path") != "/healthz":
            problems.append(f"{where}: {probe} is not /healthz")
    known = flags_of(binary, c["args"][0])
    for a in c["args"][1:]:
        flag = a.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            problems.append(f"{where}: {c['args'][0]} has no {flag}")


def check_config(binary, repo, name, text, problems):
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(text)
        f.flush()
        healthy = str(repo / "sampledata/healthy.pcap")
        r = subprocess.run([binary, "replay", healthy, "--config", f.name], capture_output=True, text=True)
        if r.returncode != 0:
            problems.append(f"ConfigMap {name}: {r.stderr.strip()}")


def check_containerfile(path, problems):
    text = path.read_text()
    runtime = text.split("FROM ")[-1]
    user = re.search(r"^USER\s+(\d+)(?::(\d+))?\s*$", runtime, re.M)
    if not user or user.group(1) == "0":
        problems.append("Containerfile: the runtime stage does not run as a numeric non-root USER")
    for caps in re.findall(r"setcap\s+(\S+)", runtime):
        granted = {c.upper().replace("CAP_", "") for c in caps.split("=")[0].split(",")}
        if granted - TAP_CAPS:
            problems.append(f"Containerfile: setcap grants {sorted(granted - TAP_CAPS)}")
    if re.search(r"cargo|rustc|gcc", runtime):
        problems.append("Containerfile: the runtime stage holds build tools")


def main():
    binary, repo = sys.argv[1], pathlib.Path(sys.argv[2])
    problems = []
    for path in sorted((repo / "packaging/kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kind, name = doc["kind"], doc["metadata"]["name"]
            if kind == "ConfigMap":
                for key, text in doc["data"].items():
                    if key.endswith(".toml"):
                        check_config(binary, repo, key, text, problems)
            elif kind in ("DaemonSet", "Deployment"):
                pod = doc["spec"]["template"]["spec"]
                for c in pod["containers"]:
                    check_container(binary, name, pod, c, problems)
    check_containerfile(repo / "packaging/container/Containerfile", problems)
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
