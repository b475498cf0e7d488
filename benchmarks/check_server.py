"""Two properties of a MongoDB server that FireWorks relies on, checked: ids handed out once,
and a findAndModify whose cost does not grow with the collection.

1. FireWorks numbers Fireworks and launches with `find_one_and_update({}, {"$inc": ...})`,
   returning the document as it was before the update: under concurrent workers every
   returned value must be distinct. 8 processes each take 300 ids from one counter document,
   once returning the document before the update (FireWorks' way) and once after; a server
   that does this atomically gives 2400 distinct ids both times.
2. FireWorks checks Fireworks out, locks workflows and completes launches with
   findAndModify. The script times one by a uniquely indexed key (and the same update by
   `update_one`) in collections of 10 to 3000 documents of 2 KB; on `mongod` both stay flat.

    python benchmarks/check_server.py [--launchpad FILE]   (default: a local server of its own)
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pymongo import ReturnDocument

from nequix_fw.store import launchpad_db

BIN = Path(sys.executable).parent
PROCESSES, IDS = 8, 300


def take(args: tuple[str, bool]) -> list[int]:
    """`IDS` ids from the counter, as FireWorks' `get_new_launch_id` takes them."""
    launchpad, after = args
    counter = launchpad_db(launchpad)["nequix_fw_check_ids"]
    side = ReturnDocument.AFTER if after else ReturnDocument.BEFORE
    return [
        counter.find_one_and_update({}, {"$inc": {"next": 1}}, return_document=side)["next"]
        for _ in range(IDS)
    ]


def check(launchpad: str) -> bool:
    counter = launchpad_db(launchpad)["nequix_fw_check_ids"]
    ok = True
    for after in (False, True):
        counter.drop()
        counter.insert_one({"next": 1})
        with multiprocessing.get_context("spawn").Pool(PROCESSES) as pool:
            ids = [i for part in pool.map(take, [(launchpad, after)] * PROCESSES) for i in part]
        side = "after (the update)" if after else "before (FireWorks' way)"
        print(
            f"document returned {side}: {len(ids)} ids taken, {len(set(ids))} distinct, "
            f"counter at {counter.find_one()['next']}"
        )
        ok &= len(set(ids)) == len(ids)
    counter.drop()
    return ok


def timing(launchpad: str) -> None:
    """findAndModify and update_one by a unique key, against the collection's size (ms)."""
    coll = launchpad_db(launchpad)["nequix_fw_check_timing"]
    print("\n| documents | find_one_and_update (ms) | update_one (ms) |\n| ---: | ---: | ---: |")
    for n in (10, 100, 1000, 3000):
        coll.drop()
        coll.create_index("k", unique=True)
        coll.insert_many([{"k": i, "pad": "x" * 2000} for i in range(n)])
        row = []
        for update in (coll.find_one_and_update, coll.update_one):
            start = time.perf_counter()
            for _ in range(30):
                update({"k": 5}, {"$set": {"x": 1}})
            row.append((time.perf_counter() - start) / 30 * 1000)
        print(f"| {n} | {row[0]:.2f} | {row[1]:.2f} |")
    coll.drop()


def fireworks_overhead(launchpad: str, sizes=(100, 10_000), n_run: int = 40) -> list[float]:
    """FireWorks' time per Firework (s) when the database already holds `sizes` finished
    Fireworks (and as many launches): `n_run` Fireworks that do nothing (`true`), run by one
    `rlaunch rapidfire`, so their wall time is all FireWorks and database. Returns one per
    size."""
    from fireworks import Firework, LaunchPad, ScriptTask, Workflow

    lp = LaunchPad.from_file(launchpad)
    out = []
    for n in sizes:
        lp.reset("", require_password=False, max_reset_wo_password=10**6)
        for _ in range(n // 100):  # finished workflows of 100 Fireworks each
            wf = Workflow([Firework(ScriptTask.from_str("true")) for _ in range(100)])
            lp.add_wf(wf)
        lp.fireworks.update_many({}, {"$set": {"state": "COMPLETED"}})
        lp.workflows.update_many({}, {"$set": {"state": "COMPLETED"}})
        ids = [f["fw_id"] for f in lp.fireworks.find({}, {"fw_id": 1})]
        lp.launches.insert_many(
            [
                {"launch_id": i, "fw_id": f, "state": "COMPLETED", "pad": "x" * 1000}
                for i, f in enumerate(ids, start=1)
            ]
        )
        lp.fw_id_assigner.update_one({}, {"$set": {"next_launch_id": len(ids) + 1}})
        lp.add_wf(Workflow([Firework(ScriptTask.from_str("true")) for _ in range(n_run)]))
        with tempfile.TemporaryDirectory() as tmp:
            start_t = time.perf_counter()
            subprocess.run(
                [BIN / "rlaunch", "-l", launchpad, "-s", "rapidfire"], cwd=tmp, check=True
            )
            out.append((time.perf_counter() - start_t) / n_run)
            print(f"among {n} finished Fireworks: {1000 * out[-1]:.0f} ms a Firework", flush=True)
        done = lp.fireworks.count_documents({"state": "COMPLETED"})
        assert done == n + n_run, f"{done} of {n + n_run} Fireworks completed"
    lp.reset("", require_password=False, max_reset_wo_password=10**6)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launchpad", help="a LaunchPad file (default: start a local server)")
    p.add_argument(
        "--fireworks",
        action="store_true",
        help="also FireWorks' time per Firework among 10^2 and 10^4 finished ones (minutes)",
    )
    args = p.parse_args()

    def checks(launchpad: str) -> bool:
        ok = check(launchpad)
        timing(launchpad)
        if args.fireworks:
            small, large = fireworks_overhead(launchpad)
            print(
                f"\nFireWorks' time per Firework: {1000 * small:.0f} ms among 10^2 Fireworks, "
                f"{1000 * large:.0f} ms among 10^4 (ratio {large / small:.2f})"
            )
        return ok

    if args.launchpad:
        ok = checks(args.launchpad)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            nfw = [BIN / "nequix-fw", "db"]
            start = ["start", "--dir", f"{tmp}/db", "--launchpad", f"{tmp}/lp.yaml"]
            subprocess.run([*nfw, *start], check=True, capture_output=True)
            try:
                ok = checks(f"{tmp}/lp.yaml")
            finally:
                subprocess.run([*nfw, "stop", "--dir", f"{tmp}/db"], capture_output=True)
    print("every id handed out once:", ok)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
