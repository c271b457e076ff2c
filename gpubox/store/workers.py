"""The workers the coordinator has seen, in SQL, for GET /workers."""

from __future__ import annotations

from gpubox import fields, models
from gpubox.store import backend


class WorkerStore(backend.Backend):
    """The store's operations on workers."""

    def save_worker(self, worker: models.WorkerInfo) -> None:
        info = {
            "version": worker.version,
            "gpus": worker.gpus,
            "labels": worker.labels,
            "max_jobs": worker.max_jobs,
            "mounts": worker.mounts,
        }
        with self._write() as cur:
            cur.execute("DELETE FROM workers WHERE name = ?", (worker.name,))
            cur.execute(
                "INSERT INTO workers (name, info, connected, last_seen) VALUES (?, ?, ?, ?)",
                (
                    worker.name,
                    fields.dump_json(info),
                    int(worker.connected),
                    models.format_time(worker.last_seen),
                ),
            )

    def list_workers(self) -> list[models.WorkerInfo]:
        with self._read() as cur:
            cur.execute("SELECT * FROM workers ORDER BY name")
            rows = cur.fetchall()
        result = []
        for row in rows:
            info = fields.load_json(row["info"])
            result.append(
                models.WorkerInfo(
                    name=row["name"],
                    version=info["version"],
                    gpus=info["gpus"],
                    labels=info["labels"],
                    max_jobs=info["max_jobs"],
                    mounts=info.get("mounts", []),
                    connected=bool(row["connected"]),
                    last_seen=models.parse_time(row["last_seen"]),  # type: ignore[arg-type]
                )
            )
        return result
