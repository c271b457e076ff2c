"""How jobs, workers and GPUs are shown on a terminal: tables and a job's summary."""

from __future__ import annotations

import shlex
from typing import Any

from gpubox import models


def printable(text: str) -> str:
    """A value for one line of a table: control characters (a newline, an escape sequence
    that would drive the terminal) shown as escapes, as Python writes them."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def needs(job: dict[str, Any]) -> str:
    """What the job asks of a worker and of its run, beyond GPUs: what a queue reason such as
    'no connected worker has the labels …' is checked against."""
    docker = job["docker"]
    parts = [f"label {printable(k)}={printable(v)}" for k, v in sorted(job["labels"].items())]
    if job.get("gpu_model"):
        parts.append(f"GPU model {printable(job['gpu_model'])}")
    if job.get("gpu_memory_gb"):
        parts.append(f"{job['gpu_memory_gb']:g} GB per GPU")
    parts += [f"mount {printable(name)}" for name in docker.get("mounts") or []]
    for key in ("memory", "shm_size"):
        if docker.get(key):
            size = docker[key]
            parts.append(
                f"{key} {size / 1024**3:g} GiB"
                if size >= 1024**3
                else f"{key} {size / 1024**2:g} MiB"
            )
    for key in ("user", "workdir"):
        if docker.get(key):
            parts.append(f"{key} {printable(docker[key])}")
    if job.get("timeout"):
        parts.append(f"timeout {job['timeout']:g} s")
    if job.get("max_retries"):
        parts.append(f"{job['max_retries']} retries")
    if job.get("idle_timeout") is not None:
        parts.append(
            f"idle_timeout {job['idle_timeout']:g} s" if job["idle_timeout"] else "never idle"
        )
    return ", ".join(parts) or "-"


def gpu_use(usage: dict[str, Any]) -> str:
    """A telemetry summary (the job's, or one GPU's) in one line."""
    energy = usage.get("energy_wh")
    return (
        f"utilization mean {usage['util_mean']:g} %, max {usage['util_max']:g} %;"
        f" peak {usage['memory_max_mb']} MiB ({usage['memory_max_pct']:g} % of the card);"
        f" {usage['gpu_seconds']:g} GPU-s" + (f"; {energy:g} Wh" if energy is not None else "")
    )


def telemetry_rows(summary: dict[str, Any] | None) -> list[tuple[str, str]]:
    """`gpubox show`'s lines for what the job did with its GPUs: the job's, then each GPU's."""
    if not summary:
        return []
    rows = [("GPU use", gpu_use(summary))]
    if len(summary.get("gpus", {})) > 1:
        rows += [("", f"{gpu}: {gpu_use(usage)}") for gpu, usage in summary["gpus"].items()]
    return rows


def summary(job: dict[str, Any]) -> str:
    """`gpubox show`: one line per field of the job, its name right-aligned."""
    result = job["result"]
    command = job["docker"]["command"]
    rows = [
        ("id", job["id"]),
        ("name", job["name"]),
        (
            "status",
            job["status"]
            + (
                " (cancel requested)"
                if job.get("cancel_requested") and job["status"] == "RUNNING"
                else ""
            ),
        ),
        ("image", job["docker"]["image"]),
        ("image id", result.get("image_id") or "-"),
        ("digest", result.get("image_digest") or "-"),
        ("command", shlex.join(command) if command else "(image default)"),
        (
            "gpus",
            job["gpus"] if not result["gpus"] else f"{job['gpus']}: {', '.join(result['gpus'])}",
        ),
        ("priority", job["priority"]),
        ("submitter", printable(job.get("submitter") or "-")),
        ("needs", needs(job)),
        ("worker", job["worker"] or "-"),
        ("attempts", job["attempts"]),
        ("created", job["created_at"]),
        ("started", result["executed_at"] or "-"),
        ("finished", result["finished_at"] or "-"),
        ("duration", f"{result['duration']} s" if result["duration"] is not None else "-"),
        ("exit code", result["exit_code"] if result["exit_code"] is not None else "-"),
        ("error", result["error"] or "-"),
        ("log lines", job.get("log_lines", 0)),
        *telemetry_rows(result.get("telemetry")),
    ]
    if job.get("queue_reason"):
        rows.insert(3, ("waiting", job["queue_reason"]))
    if job.get("queue_place"):
        rows.insert(3, ("place", place(job["queue_place"], job.get("submitter"))))
    # Every value escaped: image, command, error and the reason come from the submitter or
    # the registry, and an escape sequence in them would drive the terminal.
    return "\n".join(f"{key:>10}  {printable(str(value))}" for key, value in rows)


def _hours(hours: float) -> str:
    """GPU-hours for a person: "41", "0.25", "<0.001" for a moment's use, "0" for none."""
    if 0 < hours < 0.001:
        return "<0.001"
    return f"{hours:.3g}"


def place(where: dict[str, Any], submitter: str | None) -> str:
    """A queued job's place in the fair order, and who is ahead of it with how much use:
    "4 in the queue: 3 jobs ahead of it (3 of ci); GPU-hours used lately: ci 41, alice 2"."""
    ahead = where.get("ahead") or []
    if not ahead:
        return "next in the queue"
    count = sum(item["jobs"] for item in ahead)
    shown = ahead[:3]
    names = [item["submitter"] or "(not recorded)" for item in shown]
    parts = [f"{item['jobs']} of {name}" for item, name in zip(shown, names, strict=True)]
    if len(ahead) > len(shown):
        parts.append(f"{sum(item['jobs'] for item in ahead[len(shown) :])} of others")
    jobs = "job" if count == 1 else "jobs"
    line = f"{where['place']} in the queue: {count} {jobs} ahead of it ({', '.join(parts)})"
    if where.get("half_life_s"):
        use = [f"{n} {_hours(item['use_gpu_hours'])}" for item, n in zip(shown, names, strict=True)]
        you = "you" if submitter is None else submitter
        if submitter not in [item["submitter"] for item in shown]:
            use.append(f"{you} {_hours(where['use_gpu_hours'])}")
        line += f"; GPU-hours used lately: {', '.join(use)}"
    return line


def jobs(found: list[dict[str, Any]]) -> list[str]:
    """`gpubox ls`: a header line and one line per job, as the API gives them."""
    lines = [
        f"{'ID':>6}  {'STATUS':<9}  {'EXIT':>4}  {'CREATED':<19}  {'DURATION':>8}  {'GPUS':>4}  "
        f"{'WORKER':<16}  {'SUBMITTER':<12}  NAME"
    ]
    for job in found:
        submitter = printable(job.get("submitter") or "-")[:12]
        result = job.get("result") or {}
        code = result.get("exit_code")
        duration = result.get("duration")
        created = str(job.get("created_at") or "-")[:19].replace("T", " ")
        lines.append(
            f"{job['id']:>6}  {job['status']:<9}  {'-' if code is None else code:>4}  "
            f"{created:<19}  {_seconds(duration):>8}  {job['gpus']:>4}  "
            f"{(job['worker'] or '-')[:16]:<16}  {submitter:<12}  {printable(job['name'])}"
        )
    return lines


def _seconds(value: float | None) -> str:
    """A duration the way a person reads it: 42.1s, 12m03s, 5h07m."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def deliveries(found: list[dict[str, Any]]) -> list[str]:
    """`gpubox show`: one line per webhook delivery: event, URL, state, attempts, last answer."""
    lines = ["webhooks:"] if found else ["webhooks:     none delivered yet"]
    for d in found:
        answer = d.get("last_error") or (f"HTTP {d['last_status']}" if d["last_status"] else "-")
        lines.append(
            f"  {d['event']:<12} {printable(d['url'])}  {d['state']}, {d['attempts']}"
            f" attempt(s), last: {answer}"
        )
    return lines


def workers(found: list[dict[str, Any]]) -> list[str]:
    """`gpubox workers`: a header line and one line per worker, as the API gives them."""
    lines = [f"{'NAME':<20}  {'STATE':<12}  {'GPUS':>4}  {'JOBS':<12}  LAST HEARTBEAT"]
    for w in found:
        state = "connected" if w["connected"] else "lost"
        if w.get("quarantined"):
            state = "quarantined"  # sent a job it never confirmed: gets no more this session
        running = ",".join(map(str, w["running_jobs"])) or "-"
        lines.append(
            f"{w['name'][:20]:<20}  {state:<12}  {len(w['gpus']):>4}  {running:<12}  "
            f"{w['last_heartbeat']}"
        )
    return lines


def coordinators(answer: dict[str, Any]) -> list[str]:
    """`gpubox coordinators`: who leads, then a line per coordinator, as the API gives them."""
    if answer["store"] == "sqlite":
        return ["one coordinator: its store is SQLite, which a single coordinator serves"]
    lead = answer["leader"]
    lines = [
        f"leader: {lead['id']}, epoch {lead['epoch']}, since {lead['since']}"
        if lead
        else "leader: none (the lease has run out; a standby takes over within seconds)"
    ]
    rows = [("ID", "ROLE", "HTTP", "WORKER LINK", "PID", "TAKEOVERS", "LAST SEEN")]
    for item in answer["coordinators"]:
        rows.append(
            (
                item["id"],
                "leader" if item["leader"] else "standby",
                item["http"],
                item["link"],
                str(item["pid"]),
                str(item["takeovers"]),
                item["seen_at"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return lines


def gpus(found: list[models.Gpu], usage: list[dict[str, Any]]) -> list[str]:
    """`gpubox gpus`: a header line and one line per GPU with its memory in use and
    utilization now (`usage`, by UUID), each column as wide as its widest cell."""
    now_by_uuid = {item["uuid"]: item for item in usage}
    rows = [("INDEX", "UUID", "NAME", "MEMORY", "PCI BUS ID", "USED", "UTIL")]
    for item in found:
        now = now_by_uuid.get(item.uuid, {})
        used, util = now.get("memory_used_mb"), now.get("utilization")
        rows.append(
            (
                str(item.index),
                item.uuid,
                item.name,
                f"{item.memory_mb} MiB",
                item.pci_bus_id or "-",
                "-" if used is None else f"{used} MiB",
                "-" if util is None else f"{util} %",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
