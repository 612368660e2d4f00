"""`kvrank warm` and `kvrank store stats|verify|gc`: build and look after a persistent passage-KV store."""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvrank.cli.common import (
    CalibrationOpt,
    Data,
    Device,
    Dtype,
    KVFormatOpt,
    RayAddress,
    RayBatchSize,
    RayCpus,
    RayGpus,
    RayWorkers,
    RemoteStore,
    RerankModel,
    friendly_errors,
    ray_config,
)
from kvrank.cluster.connect import (
    DEFAULT_RAY_BATCH_SIZE,
    DEFAULT_RAY_CPUS,
    DEFAULT_RAY_GPUS,
    DEFAULT_RAY_WORKERS,
    NODE_FIELD,
)
from kvrank.defaults import DEFAULT_CALIBRATION_PASSAGES, DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_MODE, NO_RERANK
from kvrank.errors import KvrankError

if TYPE_CHECKING:
    from kvrank.store.disk import DiskKVStore
    from kvrank.store.remote import RemoteTier

console = Console(soft_wrap=True)
store_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Inspect, check and shrink a passage KV store made by `kvrank warm` and its remote tier.")
StoreDir = Annotated[Path | None, typer.Option("--store", help="Passage KV store folder (made by `kvrank warm`).")]


def parse_size(text: str) -> int:
    """'500M', '20G', '1.5GiB' or a plain byte count -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise KvrankError(f"--max-bytes {text!r} is not a size; write e.g. 500M, 20G or a byte count")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " kmgt".index(unit or " "))


def open_tiers(stack: ExitStack, store: Path | None,
               remote_store: str | None) -> tuple[DiskKVStore | None, RemoteTier | None]:
    """The store folder and the remote tier a `kvrank store` command looks after (either or both), as they are;
    given both, the remote must hold KV of the folder's identity."""
    from kvrank.store.disk import DiskKVStore
    from kvrank.store.remote import RemoteTier

    if store is None and remote_store is None:
        raise KvrankError("no store given: pass --store DIR, --remote-store URL, or both")
    local = stack.enter_context(DiskKVStore(store)) if store is not None else None
    remote = RemoteTier(remote_store, local.identity if local else None) if remote_store is not None else None
    return local, remote


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@friendly_errors
def warm(
    data: Data,
    store: Annotated[Path | None, typer.Option(
        "--store", help="KV store folder (created if new); with --remote-store alone, KV is kept in memory. With "
        "--ray, {node} in it stands for each Ray node's id: one local store per node.")] = None,
    remote_store: RemoteStore = None,
    model: RerankModel = None,
    mode: Annotated[str, typer.Option("--mode", "--rerank", help="Scoring mode the KV is for, as in `kvrank "
                                      "eval --rerank` (each prompt prefix has its own KV).")] = DEFAULT_MODE,
    max_docs: Annotated[int | None, typer.Option("--max-docs", help="Only the first N passages of the corpus.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Passages per prefill batch.")] = 16,
    max_bytes: Annotated[str | None, typer.Option("--max-bytes", help="Set the store's byte budget (e.g. 20G); "
                                                  "least recently used entries are evicted beyond it.")] = None,
    device: Device = DEFAULT_DEVICE,
    dtype: Dtype = DEFAULT_DTYPE,
    kv_format: KVFormatOpt = None,
    calibration_passages: CalibrationOpt = DEFAULT_CALIBRATION_PASSAGES,
    ray: RayAddress = None,
    ray_workers: RayWorkers = DEFAULT_RAY_WORKERS,
    ray_batch_size: RayBatchSize = DEFAULT_RAY_BATCH_SIZE,
    ray_cpus_per_worker: RayCpus = DEFAULT_RAY_CPUS,
    ray_gpus_per_worker: RayGpus = DEFAULT_RAY_GPUS,
) -> None:
    """Precompute the KV of every passage of a corpus into a store; a second run skips what is stored. With
    --ray, Ray workers prefill into their node's store (the same entries, byte for byte)."""
    from kvrank.cli.common import reranker_config
    from kvrank.eval.data import load_dataset
    from kvrank.pipeline import PipelineConfig
    from kvrank.store.disk import StoreConfig

    if max_docs is not None and max_docs < 1:
        raise KvrankError(f"--max-docs must be >= 1, got {max_docs}")
    if mode == NO_RERANK:
        raise KvrankError("--mode none has no KV to store; pass the mode `kvrank eval --rerank` uses (e.g. ql)")
    if store is None and remote_store is None:
        raise KvrankError("warm needs somewhere to keep the KV: pass --store DIR, --remote-store URL, or both")
    on_ray = ray_config(ray, ray_workers, ray_batch_size, ray_cpus_per_worker, ray_gpus_per_worker)
    if on_ray is None and NODE_FIELD in str(store):
        raise KvrankError(f"--store {store}: {NODE_FIELD} names each Ray node's store and needs --ray; pass a plain "
                          "folder")
    settings = reranker_config(mode, model=model, device=device, dtype=dtype, batch_size=batch_size)
    budget = parse_size(max_bytes) if max_bytes is not None else None
    dataset = load_dataset(data)
    passages = list(dataset.corpus.values())[:max_docs]
    config = PipelineConfig(reranker=settings, kv_format=kv_format, store_dir=store, remote_store=remote_store,
                            store_config=StoreConfig(max_bytes=budget), calibration_passages=calibration_passages)
    if on_ray is None:
        result, stores = _warm_here(config, passages)
    else:
        from kvrank.cluster import connected
        from kvrank.cluster.jobs import warm_passages

        with connected(on_ray):
            done = warm_passages(on_ray, config, passages)
        result, stores = done.result, done.stores
    console.print(f"[green]warmed[/green] {result.prefilled} passages ({result.skipped} already stored) of "
                  f"{escape(dataset.name)}: {result.tokens:,} tokens in {result.seconds:.1f} s = "
                  f"[bold]{result.tokens_per_s:,.0f} tokens/s[/bold] (model {result.prefill_s:.1f} s, store "
                  f"{result.store_s:.1f} s{f', {on_ray.workers} Ray workers' if on_ray else ''})")
    if result.evicted:
        budgets = sorted({_human(t["max_bytes"]) for t in stores.values()})
        console.print(f"[yellow]{result.evicted} entries were evicted to stay within the budget of "
                      f"{', '.join(budgets)}; pass a larger --max-bytes to keep the whole corpus[/yellow]")
    for totals in stores.values():
        console.print(f"store {escape(totals['store'])} (kv format {totals['kv_format']}): {totals['entries']} "
                      f"entries, {totals['tokens']:,} tokens, {_human(totals['bytes'])}, "
                      f"[bold]{totals['bytes_per_token']:,.0f} bytes/token[/bold] (budget "
                      f"{_human(totals['max_bytes'])})")


def _warm_here(config: Any, passages: list[Any]) -> tuple[Any, dict[str, dict[str, Any]]]:
    """`kvrank warm` in this process, with a progress bar: the result and the store's totals."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from kvrank.pipeline import build_reranker
    from kvrank.store.warm import warm as warm_passages

    reranker = build_reranker(config, passages)  # a fitted format is fitted on a sample of these passages
    columns = (TextColumn("warming"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tps]}"),
               TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("warm", total=len(passages), tps="")
            done_tokens = [0]

            def on_batch(n: int, tokens: int) -> None:
                done_tokens[0] += tokens
                elapsed = progress.tasks[task].elapsed or 1e-9
                progress.update(task, advance=n, tps=f"{done_tokens[0] / elapsed:,.0f} tok/s")

            result = warm_passages(reranker, passages, on_batch)
        totals = {"store": str(config.store_dir or "in memory"), "kv_format": reranker.config.format.name,
                  **reranker.store.totals()}
        shared = reranker.store.stats().remote
    finally:
        reranker.store.close()
    if shared is not None:
        failed = f", [yellow]{shared.errors} failed (see the log)[/yellow]" if shared.errors else ""
        console.print(f"remote {escape(str(config.remote_store))}: uploaded {shared.uploaded} entries "
                      f"({_human(shared.bytes_written)}), {shared.present} were there already{failed}")
    return result, {"local": totals}


@store_app.command("stats")
@friendly_errors
def stats(
    store: StoreDir = None,
    remote_store: RemoteStore = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: entries, tokens, bytes, bytes_per_token, "
                                          "hits, misses, evictions, ..., and `remote` (entries, bytes, "
                                          "quarantined).")] = False,
) -> None:
    """Entries, tokens, bytes and the lifetime hit/miss/eviction counters of a store; entries and bytes of its
    remote tier (one listing of it)."""
    from dataclasses import asdict

    from kvrank.store.formats import tag_format

    with ExitStack() as stack:
        local, remote = open_tiers(stack, store, remote_store)
        totals = local.totals() if local is not None else {}
        source = local if local is not None else remote
        assert source is not None  # open_tiers opens at least one
        identity = asdict(source.identity)
        shared = {"remote": {"url": remote.url, **remote.scan().as_dict()}} if remote is not None else {}
    report: dict[str, Any] = {"kv_format": tag_format(identity["storage_tag"]), **totals, **shared}
    if as_json:
        console.print_json(json.dumps({**report, "identity": identity}))
        return
    table = Table(title=f"KV store {escape(str(store or remote_store))}", show_header=False)
    rows = {**{k: v for k, v in report.items() if k != "remote"}, **identity,
            **{f"remote {k}": v for k, v in shared.get("remote", {}).items()}}
    for name, value in rows.items():
        shown = _human(value) if name.endswith("bytes") else value
        table.add_row(name, escape(f"{shown:,}" if isinstance(shown, int) else str(shown)))
    console.print(table)


# `kvrank store verify` exit codes (2 is every command's bad-input code, `friendly_errors`).
EXIT_UNREPAIRED = 1  # corrupt entries that could not be moved to quarantine/: the store still holds them
EXIT_QUARANTINED = 3  # corrupt entries were found and all quarantined: the store is clean now, but was not


@store_app.command("verify")
@friendly_errors
def verify(store: StoreDir = None, remote_store: RemoteStore = None) -> None:
    """Check every entry's checksum, in the folder and in the remote tier; corrupt entries are moved to
    quarantine/ (and recomputed when next needed). Exit 0: every entry was sound; 3: corrupt entries were found
    and quarantined (the store is sound now); 1: some could not be quarantined (check permissions)."""
    with ExitStack() as stack:
        local, remote = open_tiers(stack, store, remote_store)
        found, unmoved = _verify_local(local) if local is not None else (0, [])
        if remote is not None:
            remote_found, remote_unmoved = _verify_remote(remote)
            found, unmoved = found + remote_found, unmoved + remote_unmoved
    if unmoved:
        console.print(f"[bold red]{len(unmoved)} corrupt entries could not be moved to quarantine/[/bold red] "
                      f"(check permissions on {escape(str(store or remote_store))}): {', '.join(unmoved[:5])}")
        raise typer.Exit(EXIT_UNREPAIRED)
    if found:
        console.print(f"[yellow]{found} corrupt entries were quarantined; the store is sound now (exit "
                      f"{EXIT_QUARANTINED})[/yellow]")
        raise typer.Exit(EXIT_QUARANTINED)


def _verify_local(local: DiskKVStore) -> tuple[int, list[str]]:
    report = local.verify()
    colour = "green" if not report.corrupt else "yellow"
    console.print(f"[{colour}]checked {report.checked} entries: {report.ok} ok, {len(report.corrupt)} corrupt "
                  f"({report.quarantined} quarantined)[/{colour}]; indexed {report.adopted} complete unindexed "
                  f"files, dropped {report.dropped_rows} rows without a file, removed {report.tmp_removed} "
                  "temporary files of dead writers")
    return len(report.corrupt), report.unquarantined


def _verify_remote(remote: RemoteTier) -> tuple[int, list[str]]:
    report = remote.verify()
    colour = "green" if not report.corrupt else "yellow"
    console.print(f"[{colour}]remote {escape(remote.url)}: checked {report.checked} entries: {report.ok} ok, "
                  f"{len(report.corrupt)} corrupt ({report.quarantined} quarantined)[/{colour}]")
    return len(report.corrupt), report.unquarantined


@store_app.command("gc")
@friendly_errors
def gc(store: StoreDir = None, remote_store: RemoteStore = None,
       max_bytes: Annotated[str | None, typer.Option("--max-bytes", help="New byte budget of --store to record and "
                                                     "shrink to (e.g. 20G); default: the store's budget.")] = None
       ) -> None:
    """Remove leftovers of killed writers, reconcile the index, and evict least recently used entries to budget.
    In the remote tier: delete quarantined objects and stale temporary files (its entries are never evicted)."""
    budget = parse_size(max_bytes) if max_bytes is not None else None
    with ExitStack() as stack:
        local, remote = open_tiers(stack, store, remote_store)
        if local is not None:
            _gc_local(local, budget)
        elif budget is not None:
            raise KvrankError("--max-bytes is the budget of a --store folder; the remote tier has none (its "
                              "entries are removed by the bucket's lifecycle rules, or start a new prefix)")
        if remote is not None:
            quarantined, tmp = remote.gc()
            console.print(f"remote {escape(remote.url)}: deleted {quarantined} quarantined objects and {tmp} "
                          "temporary files of dead writers; entries are never evicted from the remote tier")


def _gc_local(local: DiskKVStore, budget: int | None) -> None:
    before = local.totals()["bytes"]
    evicted, report = local.gc(budget)
    totals = local.totals()
    console.print(f"evicted {len(evicted)} entries ({_human(before - totals['bytes'])}); removed "
                  f"{report.tmp_removed} temporary files, indexed {report.adopted} unindexed files, dropped "
                  f"{report.dropped_rows} stale rows; now {totals['entries']} entries, {_human(totals['bytes'])} of "
                  f"{_human(totals['max_bytes'])}")
