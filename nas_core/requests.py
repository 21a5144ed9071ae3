"""Edit requests: the one record type every editor and evaluator consumes.

An :class:`EditRequest` is one fact to write, with the prompts that evaluate it. Building
requests from benchmark files and fact batches, and checking them against the fact-batch
schema, is :mod:`nas_core.formats`' job.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NeighbourhoodPrompt:
    """A prompt about a *different* subject whose answer must not change.

    ``target`` is the answer the unedited model should keep preferring (CounterFact
    scores it against the edit's ``target_new``).
    """

    prompt: str
    target: str


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model.

    ``prompt`` is a template with exactly one ``{}`` where the subject goes, e.g.
    ``"{} is located in"``; ``target_new`` is the answer to write, ``target_true`` the
    answer the model gives today. Targets are stored without a leading space; the
    tokenisation code adds the space that separates them from the prompt.
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str
    relation_id: str = ""
    paraphrase_prompts: tuple[str, ...] = ()
    neighbourhood_prompts: tuple[NeighbourhoodPrompt, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    @property
    def filled_prompt(self) -> str:
        """The prompt with the subject in place."""
        return self.prompt.replace("{}", self.subject)


__all__ = ["EditRequest", "NeighbourhoodPrompt"]
