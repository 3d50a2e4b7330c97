"""Run one task of `concept-shard build` (or the whole job), and `merge`.

A task: collect the split files, plan row-range units (plan.py), write the units dealt to
this task that are not already finished, join the files whose ranges it owns entirely, and
report. Files split across tasks are joined by `merge` (or by the single-task build itself).
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

from concept_config.data import DataModuleKeys
from concept_config.project import PathKeys, ShardKeys

from .cells import GeneMap, build_gene_map
from .datasets import Expectation, ShardStore, settings_digest
from .errors import ConfigError, ShardError, UserError
from .finalize import PartsMismatch, finished_parts, join_parts, write_species_indexes
from .fingerprint import source_mtime_ns
from .layout import DatasetLayout, exclusive, read_json, remove_tree, write_json_atomic
from .plan import WorkUnit, assign, file_ranges
from .source import AnnDataSource
from .splits import SourceFile, collect_source_files
from .vocabulary import Vocabulary, load_vocabulary
from .writer import PartSettings, write_part


@dataclass
class FileJob:
    sf: SourceFile
    layout: DatasetLayout
    ranges: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])
    error: UserError | None = None
    _expected: Expectation | None = None
    damaged_record: dict | None = None  # the dataset.json of a dataset found damaged (being rebuilt)


SUMMARY_FIELDS = ("species", "cells_written", "nonzeros", "shard_bytes", "cells_dropped")


@dataclass
class BuildReport:
    built: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # parts owned by other tasks
    failed: list[UserError] = field(default_factory=list)
    failed_ids: set[str] = field(default_factory=set)
    datasets: list[dict] = field(default_factory=list)  # SUMMARY_FIELDS of each complete dataset

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


class ShardJob:
    """The composed config's files, their plan and their state on disk."""

    def __init__(
        self,
        paths: PathKeys,
        shard: ShardKeys,
        dm: DataModuleKeys,
        progress: bool = True,
        lamin=None,
        log=print,
        verify: bool = False,
    ):
        self.paths, self.progress, self.lamin, self.log = paths, progress, lamin, log
        self.verify = verify  # hash every shard file of every complete dataset (--verify)
        self.project = Path(paths.PROJECT_PATH)
        remote_url = paths.SHARDS_REMOTE
        if remote_url and lamin is not None:
            raise ConfigError(
                "--lamindb",
                f"registers shards in place, which is not supported for remote shards "
                f"(PATH.SHARDS_REMOTE={remote_url}).",
                "Run without --lamindb, or shard to a local PATH.SHARDS_PATH inside the instance.",
            )
        self.store = ShardStore.from_paths(paths)
        self.shards_root = self.store.root  # where datasets are built (staged, when remote)
        self.remote = self.store.remote
        # the schema checked every value (concept_config.project.ShardKeys)
        self.settings = PartSettings(
            obs_keys=list(dm.obs_keys),
            chunk_size=shard.chunk_size,
            shard_size_limit=shard.shard_size_limit,
            compression=shard.compression or None,
            entries=shard.entries,
            allow_non_integral=shard.allow_non_integral,
        )
        self.part_size = shard.part_size
        self._vocabs: dict[str, Vocabulary | UserError] = {}
        files, self.config_errors = collect_source_files(paths, dm)
        self.jobs = [FileJob(sf, self.store.local(sf)) for sf in files]
        for job in self.jobs:
            self._probe(job)

    # ---- per-file facts ------------------------------------------------------------------
    def vocab(self, species: str) -> Vocabulary:
        if species not in self._vocabs:
            try:
                self._vocabs[species] = load_vocabulary(Path(self.paths.GENE_MAPPINGS_PATH), species)
            except UserError as err:
                self._vocabs[species] = err
        v = self._vocabs[species]
        if isinstance(v, UserError):
            raise v
        return v

    def _probe(self, job: FileJob) -> None:
        """Resolve lamindb keys and read the cell count, recording (not raising) errors."""
        try:
            if job.sf.lamindb_key is not None:
                if self.lamin is None:
                    raise ShardError(
                        job.sf.split_key,
                        f"lists lamindb artifact `{job.sf.name}`.",
                        "Run with --lamindb (or lamindb.enabled=true) to resolve artifact keys.",
                    )
                job.sf.path = self.lamin.resolve_key(job.sf.lamindb_key)
            with _open(job.sf) as src:
                job.ranges = file_ranges(src.n_cells, self.part_size)
        except UserError as err:
            job.error = err

    def expected(self, job: FileJob) -> Expectation:
        """What the file's dataset must match to be current (datasets.py)."""
        if job._expected is None:
            vocab = self.vocab(job.sf.species)
            digest = settings_digest(self.settings.digest_fields(vocab), job.sf.var_gene_id_column)
            # the same settings in the shard format before varint entries: such a dataset is
            # rebuilt, and the status says why and how to keep it
            earlier = replace(self.settings, entries="arrays", compression="zstd:1")
            job._expected = Expectation(
                vocab,
                job.sf.path,
                digest,
                earlier_digest=settings_digest(earlier.digest_fields(vocab), job.sf.var_gene_id_column),
            )
        return job._expected

    def identity(self, job: FileJob) -> dict:
        """What a finished part or dataset must match to be reused."""
        return self.expected(job).identity()

    def state(self, job: FileJob, full: bool | None = None) -> tuple[str, dict | None, str | None]:
        """('done'|'stale'|'damaged'|'absent', dataset.json, why not done) of the file's published
        dataset. 'damaged': current, but its files are not what its records say (integrity.py;
        every shard hashed with `full`, default: `verify`)."""
        state, record, why = self._state(job, self.store.record(job.sf))
        if state == "done":
            full = self.verify if full is None else full
            problem = self.store.damage(job.sf, record, self.vocab(job.sf.species), full=full)
            if problem is not None:
                job.damaged_record = record
                return "damaged", record, problem.reason
        return state, record, why

    def staged(self, job: FileJob) -> bool:
        """Remote only: the dataset is complete and current locally but not uploaded yet (a run was
        stopped between joining and uploading)."""
        return self.remote is not None and self._state(job, read_json(job.layout.dataset_json))[0] == "done"

    def _state(self, job: FileJob, record: dict | None) -> tuple[str, dict | None, str | None]:
        if record is None:
            return "absent", None, None
        try:
            problem = self.expected(job).problem(record, job.layout.dataset_json)
        except (UserError, OSError) as exc:
            return "stale", record, str(exc)
        if problem is None:
            return "done", record, None
        return ("damaged" if problem.damaged else "stale"), record, problem.reason

    def _note_mtime(self, job: FileJob, record: dict) -> None:
        """A source whose mtime moved but whose content is unchanged (copied, touched) was found
        current by a full content check; record its new mtime so the next check is cheap again."""
        if self.remote is not None or record.get("source_mtime_ns") is None:
            return
        mtime = source_mtime_ns(job.sf.path)
        if mtime == record["source_mtime_ns"]:
            return
        with exclusive(job.layout.join_lock) as mine:
            if mine and read_json(job.layout.dataset_json) == record:
                write_json_atomic(job.layout.dataset_json, dict(record, source_mtime_ns=mtime))

    def units(self) -> list[WorkUnit]:
        return [WorkUnit(j.sf.dataset_id, a, b) for j in self.jobs for a, b in j.ranges]

    def pending(self) -> dict[str, list[tuple[int, int]]]:
        """{dataset id: row ranges} of the files that are not complete and current as the cheap
        check sees them (what a build would write; no shard is hashed here)."""
        out = {}
        for job in self.jobs:
            if job.error is None:
                try:
                    if self.state(job, full=False)[0] == "done":
                        continue
                except UserError:
                    pass  # the task that meets it names it
            out[job.sf.dataset_id] = list(job.ranges)
        return out

    # ---- work ----------------------------------------------------------------------------
    def run_task(self, task_index: int = 0, num_tasks: int = 1) -> BuildReport:
        report = BuildReport(failed=list(self.config_errors))
        mine = assign(self.units(), num_tasks)[task_index]
        by_id = {j.sf.dataset_id: j for j in self.jobs}
        my_ids = sorted({u.dataset_id for u in mine})
        todo: list[tuple[FileJob, list[WorkUnit], bool]] = []
        for ds_id in my_ids:
            job = by_id[ds_id]
            if job.error is not None:
                self._fail(job, job.ranges[0][0], job.error, report)
                continue
            try:
                state, record, why = self.state(job)
                ident = self.identity(job)
            except UserError as err:
                self._fail(job, 0, err, report)
                continue
            if state == "done":
                report.up_to_date.append(ds_id)
                self._note_mtime(job, record)
                self._register(job, record, report)
                continue
            if state in ("stale", "damaged"):
                self.log(f"[concept-shard] {ds_id}: {why}; rebuilding.")
                report.rebuilt.append(ds_id)
            if self.staged(job):
                self._publish(job, report)
                continue
            done = finished_parts(job.layout, ident)
            units = [u for u in mine if u.dataset_id == ds_id and (u.start, u.end) not in done]
            owns_all = all(WorkUnit(ds_id, a, b) in mine for a, b in job.ranges)
            todo.append((job, units, owns_all or num_tasks == 1))
        bar = self._progress_bar(sum(u.cells for _, units, _ in todo for u in units))
        with bar:
            # file by file, joining each as soon as its rows are written, so a long run that is
            # killed leaves every file it finished complete and visible
            for job, units, owns_all in todo:
                if not self._write_units(job, units, report, bar):
                    continue
                if owns_all:
                    self._join(job, report)
                else:
                    report.waiting.append(job.sf.dataset_id)
        if num_tasks == 1:
            self._write_species_indexes()
        report.datasets = self._complete_datasets()
        return report

    def merge(self) -> BuildReport:
        """Join every file whose parts are all finished; write species indexes. Idempotent."""
        report = BuildReport(failed=list(self.config_errors))
        for job in self.jobs:
            ds_id = job.sf.dataset_id
            if job.error is not None:
                report.failed.append(job.error)
                continue
            try:
                state, record, why = self.state(job)
            except UserError as err:
                report.failed.append(err)
                continue
            if state == "done":
                report.up_to_date.append(ds_id)
                self._register(job, record, report)
                continue
            if self.staged(job):
                self._publish(job, report)
                continue
            if self._tiling(job) is None:
                failures = job.layout.failures()
                if failures:
                    report.failed += [ShardError(**{k: f[k] for k in ("where", "problem", "fix")}) for f in failures]
                    report.failed_ids.add(ds_id)
                elif state == "damaged":  # no task rebuilt it: merge only joins
                    report.failed.append(
                        ShardError(ds_id, f"is {why}.", "Run `concept-shard build`: it rebuilds damaged datasets.")
                    )
                    report.failed_ids.add(ds_id)
                else:
                    report.waiting.append(ds_id)
                continue
            self._join(job, report)
        self._write_species_indexes()
        report.datasets = self._complete_datasets()
        return report

    def _write_species_indexes(self) -> None:
        if self.remote is not None:
            self.remote.write_species_indexes(sorted({j.sf.species for j in self.jobs}))
        elif self.shards_root.is_dir():
            write_species_indexes(self.shards_root)

    def _progress_bar(self, total: int):
        from tqdm import tqdm

        return tqdm(
            total=total,
            unit="cells",
            unit_scale=True,
            desc="concept-shard",
            disable=not self.progress,
            mininterval=1 if sys.stderr.isatty() else 30,
            dynamic_ncols=True,
        )

    def _write_units(self, job: FileJob, units: list[WorkUnit], report: BuildReport, bar) -> bool:
        """Write a file's pending units; on the first error mark the file failed and move on.
        False when the file cannot be joined now (an error, or rows another build is writing)."""
        gene_map: list = []
        complete = True
        for i, unit in enumerate(units):
            try:
                with exclusive(job.layout.part_lock(unit.start, unit.end)) as mine:
                    if not mine:  # a re-submitted array while the first still runs: never share a part
                        self.log(
                            f"[concept-shard] {job.sf.dataset_id}: rows {unit.start}-{unit.end} are being "
                            "written by another build; skipped here."
                        )
                        complete = False
                    if mine and not self._unit_done(job, unit):  # another build may have finished it meanwhile
                        self._write_unit(job, unit, gene_map, bar)  # (write_part advances the bar)
                    else:
                        bar.update(unit.cells)
                    job.layout.failed_marker(unit.start).unlink(missing_ok=True)
            except Exception as exc:  # one bad file must not stop the others
                err = (
                    exc
                    if isinstance(exc, UserError)
                    else ShardError(
                        job.sf.path,
                        f"failed while sharding rows {unit.start}-{unit.end} ({type(exc).__name__}: {exc}).",
                        "See the traceback in the failed_*.json marker under the shards' .parts directory; "
                        "re-run `concept-shard build` after fixing the cause.",
                    )
                )
                self._fail(job, unit.start, err, report, traceback.format_exc())
                remove_tree(job.layout.part_tmp(unit.start, unit.end))
                bar.update(sum(u.cells for u in units[i:]))
                return False
        if not complete:
            report.waiting.append(job.sf.dataset_id)
        return complete

    def _unit_done(self, job: FileJob, unit: WorkUnit) -> bool:
        """The unit's part is finished and current, or the whole dataset already is."""
        if (unit.start, unit.end) in finished_parts(job.layout, self.identity(job)):
            return True
        return self._joined_meanwhile(job)

    def _joined_meanwhile(self, job: FileJob) -> bool:
        """The dataset is complete and current now (another build joined it since this one looked);
        one found damaged counts only once its dataset.json was replaced."""
        record = read_json(job.layout.dataset_json)
        return record != job.damaged_record and self._state(job, record)[0] == "done"

    def _write_unit(self, job: FileJob, unit: WorkUnit, gene_map: list, bar) -> None:
        vocab = self.vocab(job.sf.species)
        with _open(job.sf) as src:
            if not gene_map:  # once per file, shared by its units
                gene_map.append(build_gene_map(job.sf.path, src.gene_ids(), vocab, job.sf.var_gene_id_column))
            gm = gene_map[0]
            expected = self.expected(job)
            expected.start_content_hash()
            info = self._dataset_info(job, src, gm, vocab)
            write_part(
                src,
                job.layout,
                gm,
                vocab,
                unit.start,
                unit.end,
                self.settings,
                info,
                progress=bar,
                late=lambda: {"source_content_hash": expected.content_hash()},
            )

    def _dataset_info(self, job: FileJob, src: AnnDataSource, gm: GeneMap, vocab: Vocabulary) -> dict:
        ident = self.identity(job)
        sf = job.sf
        return dict(
            ident,
            species=sf.species,
            source_name=sf.source_name,
            source_file=_relative(sf.path, self.project),
            source_size=self.expected(job).source_size,
            source_mtime_ns=source_mtime_ns(sf.path),
            lamindb_key=sf.lamindb_key,
            vocabulary_file=_relative(vocab.path, self.project),
            matrix=src.matrix_key,
            matrix_format=src.format,
            gene_id_column=sf.var_gene_id_column,
            n_cells_source=src.n_cells,
            n_genes_source=gm.n_source_genes,
            genes=gm.tokens.tolist(),
            genes_dropped=gm.n_source_genes - gm.n_in_vocab,
            genes_dropped_examples=gm.dropped_examples,
            obs_keys=self.settings.obs_keys,
            columns=self.settings.columns(vocab),
        )

    def _tiling(self, job: FileJob) -> list[tuple[int, int]] | None:
        """The finished parts on disk if they cover all rows exactly once, else None.

        Taken from disk rather than from the plan, so `merge` joins what the array tasks wrote
        even when it is run with another `shard.part_size`.
        """
        ranges, pos = [], 0
        for a, b in sorted(finished_parts(job.layout, self.identity(job))):
            if a != pos:
                return None
            ranges.append((a, b))
            pos = b
        return ranges if ranges and pos == job.ranges[-1][1] else None

    def _join(self, job: FileJob, report: BuildReport) -> None:
        """Join the file's parts into its dataset, under the file's join lock."""
        with exclusive(job.layout.join_lock) as mine:
            if not mine:
                self.log(f"[concept-shard] {job.sf.dataset_id}: another build is joining it; skipped here.")
                report.waiting.append(job.sf.dataset_id)
                return
            self._join_locked(job, report)

    def _join_locked(self, job: FileJob, report: BuildReport) -> None:
        if self._joined_meanwhile(job):
            if self.remote is not None:
                self._publish(job, report)
            else:
                report.up_to_date.append(job.sf.dataset_id)
            return
        for leftover in job.layout.leftovers():  # of a join killed half-way: never counted, never kept
            remove_tree(leftover)
        ranges = self._tiling(job)
        if ranges is None:
            report.waiting.append(job.sf.dataset_id)
            return
        parts = finished_parts(job.layout, self.identity(job))
        first = parts[ranges[0]]
        info = {
            k: v
            for k, v in first.items()
            if k
            not in (
                "start",
                "end",
                "cells_written",
                "nonzeros",
                "cells_dropped_no_nonzero",
                "shard_bytes",
                "obs_keys_absent",
            )
        }
        try:
            record = join_parts(job.layout, ranges, parts, info)
        except PartsMismatch as exc:
            remove_tree(job.layout.parts_dir)  # the next build writes them again
            self._fail(
                job,
                ranges[0][0],
                ShardError(
                    job.sf.path,
                    f"could not be joined: {exc}; its parts were removed.",
                    "Re-run `concept-shard build`: it writes them again.",
                ),
                report,
            )
            return
        if self.remote is not None:
            self._publish(job, report)
            return
        report.built.append(job.sf.dataset_id)
        self._register(job, record, report)

    def _publish(self, job: FileJob, report: BuildReport) -> None:
        """Upload a dataset complete in the staging dir (dataset.json last), then delete the staged
        copy: a run stopped before the upload ends re-uploads it without rebuilding."""
        try:
            self.remote.upload_dataset(job.layout.dataset_dir, job.sf.dataset_id)
        except UserError as err:
            report.failed.append(err)
            report.failed_ids.add(job.sf.dataset_id)
            return
        remove_tree(job.layout.dataset_dir)
        report.built.append(job.sf.dataset_id)

    def _register(self, job: FileJob, record: dict, report: BuildReport) -> None:
        if self.lamin is None:
            return
        try:
            self.lamin.register(job.sf, job.layout.dataset_dir, record)
        except UserError as err:
            report.failed.append(err)
            report.failed_ids.add(job.sf.dataset_id)

    def _fail(self, job: FileJob, start: int, err: UserError, report: BuildReport, tb: str | None = None) -> None:
        report.failed.append(err)
        report.failed_ids.add(job.sf.dataset_id)
        try:
            job.layout.parts_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(job.layout.failed_marker(start), dict(err.to_json(), start=start, traceback=tb))
        except OSError:
            pass

    def _complete_datasets(self) -> list[dict]:
        """The summary table's fields of every complete dataset: a whole dataset.json holds the
        file's gene list (MBs at 60k genes), and keeping thousands of them grew the build's memory
        with the number of files."""
        out = []
        for job in self.jobs:
            record = self.store.record(job.sf)
            try:  # a damaged dataset.json (reported as such) is left out of the table
                summary = {k: record[k] for k in SUMMARY_FIELDS}
                counts = ("cells_written", "nonzeros", "shard_bytes")
                sum([*(summary[k] for k in counts), *summary["cells_dropped"].values()])
            except (TypeError, KeyError, AttributeError):
                continue
            out.append(summary)
        return out


def _open(sf: SourceFile) -> AnnDataSource:
    return AnnDataSource(sf.path, sf.var_gene_id_column, listed_in=f"split {sf.split_key}")


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())
