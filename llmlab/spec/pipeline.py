"""The pipeline as a whole: name, seed, tokenizer, model, stages, and what runs around them.

    spec = load_spec("pipelines/tiny.yaml")     # llmlab.spec.load builds a Pipeline
    spec.stage_names()                           # concrete stages, in the order they run
    spec.dependencies("dpo")                     # {name it reads: concrete stage}

After loading, `stages` holds the concrete stages (sweeps fanned out, rounds unrolled:
`llmlab.spec.graph`). Never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pydantic import Field, PrivateAttr

from llmlab.spec.base import Loc, StrictModel
from llmlab.spec.blocks import ModelSpec, TokenizerSpec
from llmlab.spec.graph import Graph, Selection, Variant
from llmlab.spec.stages import Stage


class TrackingSpec(StrictModel):
    """Where MLflow records runs. None = $MLFLOW_TRACKING_URI, else SQLite under the state dir."""

    uri: str | None = Field(None, description="an MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else SQLite under "
                                              "the state directory")
    experiment: str | None = Field(None, description="the MLflow experiment; None = the pipeline's name")
    wait_seconds: float = Field(60.0, ge=0, description="at a stage's end, how long to wait for an MLflow that stopped "
                                                        "answering during the stage (its records wait on disk after "
                                                        "that, and are sent later)")
    required: bool = Field(False, description="true: a run refuses to start while MLflow does not answer; false: it "
                                              "runs, and its records wait on disk until MLflow answers")


class RepeatSpec(StrictModel):
    """Rounds: run `stages` (consecutive in the spec) `times` times, each round from the last one's model."""

    stages: list[str] = Field(min_length=1, description="consecutive stages of the spec, run in this order each round")
    times: int = Field(ge=1, le=100, description="how many rounds")


class PromoteSpec(StrictModel):
    """Give the registered model of stage `model` the MLflow alias `alias` only when every gate holds.
    Gates are `METRIC OP BOUND` over the stage's metrics and those `metrics_from` (an eval stage)
    reported for it (`exact_match` for its `dpo/exact_match`); a bound `champion.<metric>` is the
    recorded metric of the version that holds the alias now (no holder yet: such gates pass)."""

    model: str = Field(description="the stage whose registered model version may get the alias")
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", description="the MLflow registry alias to give")
    gates: list[str] = Field(default_factory=list, description="conditions, e.g. 'exact_match >= champion.exact_match'; "
                                                               "every one must hold")
    metrics_from: str | None = Field(None, description="an eval stage whose metrics of the model the gates may read")

    def rules(self) -> Iterator[tuple[Loc, str]]:
        from llmlab.gates import parse_gate

        for i, gate in enumerate(self.gates):
            try:
                parse_gate(gate)
            except ValueError as exc:
                yield ("gates", i), str(exc)


class Pipeline(StrictModel):
    """A whole pipeline: tokenizer, architecture, and named stages in declaration order. After
    loading, `stages` holds the concrete stages (sweeps fanned out, rounds unrolled:
    `llmlab.spec.graph`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the pipeline's name: its MLflow "
                                                                          "experiment and Prefect flow runs")
    seed: int = Field(1234, description="seeds every stage: data order, initial weights, sampling")
    workdir: str | None = Field(None, description="stage outputs go to <workdir>/<stage>/; None = runs/<name>")
    tokenizer: TokenizerSpec | None = Field(None, description="train a tokenizer, or load one by hub name or path; "
                                                             "needed by a pretrain stage that starts from scratch (a "
                                                             "stage that starts from a model uses that model's own)")
    model: ModelSpec = Field(default_factory=ModelSpec, description="the architecture of a model trained from scratch")
    stages: dict[str, Stage] = Field(min_length=1, description="name -> stage, in execution order; `from` makes the graph")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="where MLflow records the runs")
    repeat: RepeatSpec | list[RepeatSpec] | None = Field(None, description="groups of stages run in rounds")
    promote: PromoteSpec | None = Field(None, description="which model gets a registry alias, and when")
    max_parallel: int | None = Field(None, ge=1, description="sweep branches run at once; None = one per visible GPU, "
                                                             "1 on CPU")
    _graph: Graph | None = PrivateAttr(None)

    @property
    def trains_tokenizer(self) -> bool:
        """Whether the pipeline's first stage trains its tokenizer (`tokenizer: {train: ...}`)."""
        return self.tokenizer is not None and self.tokenizer.train is not None

    @property
    def output_root(self) -> str:
        return self.workdir or f"runs/{self.name}"

    @property
    def graph(self) -> Graph:
        if self._graph is None:  # a Pipeline built directly, not by load_spec: no sweeps, no rounds
            g = Graph(order=list(self.stages))
            for name, stage in self.stages.items():
                g.refs[name] = {r: r for r in stage.inputs}
                g.variants[name] = Variant(name)
                g.folders[name] = name
            self._graph = g
        return self._graph

    def stage_names(self) -> list[str]:
        """All concrete stages in execution order, the implicit `tokenizer` stage first when it trains."""
        first = ["tokenizer"] if self.trains_tokenizer else []
        return first + list(self.graph.order)

    def stage_dir(self, stage: str) -> Path:
        """The folder of a concrete stage: `<workdir>/<stage>`, `<workdir>/<stage>/<variant>` for a
        branch of a sweep, `<workdir>/<stage>/round-<k>` for a round."""
        return Path(self.output_root) / self.graph.folders.get(stage, stage)

    def dependencies(self, stage: str, chosen: str | None = None) -> dict[str, str]:
        """{name the stage reads: concrete stage} including the trained tokenizer; for a stage that
        selects a branch, `chosen` names the winning branch of its judge (else the first one's refs)."""
        deps = {"tokenizer": "tokenizer"} if self.trains_tokenizer and stage != "tokenizer" else {}
        if stage == "tokenizer":
            return deps
        selection = self.graph.selections.get(stage)
        if selection is not None and chosen is not None:
            return {**deps, **selection.options[chosen]}
        return {**deps, **self.graph.refs[stage]}

    def variant(self, stage: str) -> Variant:
        return self.graph.variants.get(stage) or Variant(stage)

    def branch_values(self, stage: str) -> dict[str, Any]:
        """The swept values a concrete stage runs with or follows (an eval branch: its dpo branch's)."""
        variant = self.variant(stage)
        values: dict[str, Any] = {}
        for base, label in variant.assign.items():
            values.update(self.graph.labels.get(base, {}).get(label, {}))
        return {**values, **variant.values}

    def selection(self, stage: str) -> Selection | None:
        return self.graph.selections.get(stage)

    def base_stage(self, stage: str) -> str:
        """The stage as the spec file names it (`dpo` for `dpo[beta=0.1]` and `dpo#2`)."""
        return self.variant(stage).base

    def expand_names(self, names: list[str]) -> list[str]:
        """Concrete stages for names a user gives: a written stage means all its branches and rounds."""
        out = []
        for n in names:
            out += [n] if n == "tokenizer" or n in self.graph.variants else self.graph.branches(n)
        return list(dict.fromkeys(out))
