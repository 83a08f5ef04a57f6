"""Randomized fault episodes, and whether any sample was lost, repeated or wrong.

    python bench/chaos.py [--episodes 200] [--seed 0] [--out bench/results] [--tiny]

Each episode draws its kind, then its faults and loader at random (tests/chaos_episodes.py), over
stores of 1,000 id-encoded samples in shards of 100 (x[i] encodes i, so a wrong sample shows):

- s3 (60% of episodes): an epoch of a random 10-50% of the store on moto's S3, read through
  tests/faults.py's FaultyProxy, which answers 1-8% of the shard objects' GETs with a 503, a 500, a
  connection reset, a body cut short or cut, or a stall past the read timeout; random batch size,
  order and coalescing; half the time stopped at a random batch and resumed on a fresh loader.
- server (10%): `nearstore serve` SIGKILLed at a random batch of a loader's epoch (a round made
  before it half the time) and restarted on its state dir; the loader reconnects.
- disk full (10%): the disk under the server's state dir fills while it holds two rounds and a
  trainer iterates the older; another trainer asks for a third.
- concurrent selects (10%): two trainers ask the server for a new round at once, then each
  iterates the round it was answered.
- dask (10%): a worker killed as it starts a random pass of a SAGE scan; the selection must equal
  the one made in process.

Prints, per kind and in all: episodes, faults injected by kind, samples checked, lost, repeated and
wrong, and failures told without their cause ("no cause"); writes chaos.json and chaos.png. The target: 0 lost,
repeated or wrong over 200 episodes or more.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the episodes, the proxy and moto's server live with the tests

from chaos_episodes import (  # noqa: E402
    Tally,
    concurrent_selects_episode,
    dask_episode,
    disk_full_episode,
    proxy_options,
    s3_episode,
    server_episode,
    shard_object,
)
from conftest import id_encoded  # noqa: E402
from faults import FaultyProxy  # noqa: E402
from servers import S3Server  # noqa: E402

from nearstore import write_dataset  # noqa: E402
from nearstore.selection import local_cluster  # noqa: E402

KINDS = {"s3": 0.6, "server": 0.1, "disk full": 0.1, "concurrent selects": 0.1, "dask": 0.1}
NUM_SAMPLES, SHARD_SAMPLES = 1000, 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="a smoke run: one episode of each kind")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    kinds = list(KINDS) if args.tiny else list(rng.choice(list(KINDS), args.episodes, p=list(KINDS.values())))
    started = time.perf_counter()
    tallies = run(kinds, rng)
    seconds = time.perf_counter() - started
    total = Tally()
    for part in tallies.values():
        total += part
    report(tallies, total, seconds)
    result = {
        "episodes": total.episodes,
        "seconds": seconds,
        "seed": args.seed,
        "kinds": {kind: as_dict(part) for kind, part in tallies.items()},
        "total": as_dict(total),
    }
    (args.out / "chaos.json").write_text(json.dumps(result, indent=2))
    plot(tallies, total, args.out / "chaos.png")
    print(f"wrote {args.out / 'chaos.json'} and {args.out / 'chaos.png'}")


def run(kinds: list[str], rng: np.random.Generator) -> dict[str, Tally]:
    """Each episode of `kinds` in turn, tallied by kind; one S3, one proxy, one store and (if
    any episode needs it) one Dask cluster for them all."""
    tallies = {kind: Tally() for kind in KINDS if kind in kinds}
    s3 = S3Server().start()
    with tempfile.TemporaryDirectory() as workdir, FaultyProxy(s3.endpoint, rate=0.0, where=shard_object) as proxy:
        import fsspec

        fsspec.filesystem("s3", **s3.storage_options).mkdir("chaos")
        url = "s3://chaos/ids.zarr"
        write_dataset(url, [id_encoded(NUM_SAMPLES)], shard_samples=SHARD_SAMPLES, storage_options=s3.storage_options)
        local = write_dataset(f"{workdir}/ids.zarr", [id_encoded(NUM_SAMPLES)], shard_samples=SHARD_SAMPLES)
        storage = proxy_options(proxy, s3.storage_options)
        cluster = client = None
        try:
            for number, kind in enumerate(kinds):
                here = Path(workdir) / f"episode-{number}"
                if kind == "s3":
                    outcome = s3_episode(proxy, storage, url, NUM_SAMPLES, rng)
                elif kind == "server":
                    outcome = server_episode(local.url, NUM_SAMPLES, here, rng)
                elif kind == "disk full":
                    outcome = disk_full_episode(local.url, NUM_SAMPLES, here, rng)
                elif kind == "concurrent selects":
                    outcome = concurrent_selects_episode(local, rng)
                else:
                    if client is None:
                        cluster, client = dask_cluster()
                    outcome = dask_episode(client, local, here, rng)
                tallies[kind] += outcome
                print(f"episode {number} ({kind}): {line(outcome)}", flush=True)
        finally:
            if client is not None:
                client.close()
                cluster.close()
            s3.stop()
    return tallies


def dask_cluster():
    """Two worker processes on 127.0.0.1, and a client of them."""
    import distributed

    cluster = local_cluster()
    return cluster, distributed.Client(cluster)


def line(t: Tally) -> str:
    faults = ", ".join(f"{kind} {n}" for kind, n in sorted(t.faults.items())) or "none"
    return (
        f"{t.samples} samples: {t.lost} lost, {t.repeated} repeated, {t.wrong} wrong; "
        f"faults: {faults}; {t.retries} short ranges asked again; {t.unexplained} failures told without cause"
    )


def report(tallies: dict[str, Tally], total: Tally, seconds: float) -> None:
    head = ("kind", "episodes", "faults", "samples", "lost", "repeated", "wrong", "no cause")
    print("\n" + f"{head[0]:20s}" + "".join(f"{h:>9s}" for h in head[1:]))
    for kind, t in [*tallies.items(), ("all", total)]:
        counts = (t.episodes, t.faults.total(), t.samples, t.lost, t.repeated, t.wrong, t.unexplained)
        print(f"{kind:20s}" + "".join(f"{n:9d}" for n in counts))
    print("faults injected: " + ", ".join(f"{kind} {n}" for kind, n in total.faults.most_common()))
    print(f"{total.episodes} episodes in {seconds:.0f} s; target: 0 lost, repeated or wrong")


def as_dict(t: Tally) -> dict:
    fields = ("episodes", "samples", "lost", "repeated", "wrong", "retries", "unexplained")
    return {**{name: getattr(t, name) for name in fields}, "faults": dict(t.faults)}


def plot(tallies: dict[str, Tally], total: Tally, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    faults = total.faults.most_common()
    left.barh([kind for kind, _ in faults], [n for _, n in faults])
    left.set(xlabel="faults injected", title=f"{total.episodes} episodes")
    kinds = list(tallies)
    at = np.arange(len(kinds))
    for k, (name, color) in enumerate((("lost", "C3"), ("repeated", "C1"), ("wrong", "C4"))):
        right.bar(at + (k - 1) * 0.25, [getattr(tallies[kind], name) for kind in kinds], 0.25, color=color, label=name)
    right.set_xticks(at, kinds, rotation=20, fontsize=8)
    right.set(ylabel="samples", title="samples lost, repeated, wrong (target: 0)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
