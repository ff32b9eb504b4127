"""Turn a VQA record into chat messages: the MedVLM-R1 instruction (arXiv 2502.19634), as config.

The same builder formats the tiny model's warm-start data and every training/eval prompt, so
the model is always asked the question the way it was taught to answer it.
"""

from __future__ import annotations

from medvr.data.schema import LETTERS


class PromptBuilder:
    """Formats a record's question with the instruction of its answer type into a Qwen-style chat.

    `template` asks a lettered multiple-choice question ({question}, {options}); `closed_template`
    a yes/no question and `open_template` a short-answer one ({question}), all in the same
    <think>/<answer> format. It also holds the text of the zoom protocol (tool instructions and
    observation turns), so the tiny model's warm start and the zoom environment speak alike.
    """

    def __init__(
        self,
        template: str,
        closed_template: str | None = None,
        open_template: str | None = None,
        system: str | None = None,
        zoom_system: str | None = None,
        observation: str | None = None,
        invalid_observation: str | None = None,
    ):
        self.templates = {"choice": template, "closed": closed_template, "open": open_template}
        self.system = system
        self.zoom_system = zoom_system
        self.observation = observation
        self.invalid_observation = invalid_observation

    def text(self, question: str, options: list[str], answer_type: str | None = None) -> str:
        """The user turn's text; `answer_type` None means a lettered choice question."""
        answer_type = answer_type or "choice"
        template = self.templates.get(answer_type)
        if template is None:
            raise ValueError(
                f"prompt has no template for {answer_type!r} questions; set prompt.{answer_type}_template "
                f"(known: {[k for k, v in self.templates.items() if v is not None]})"
            )
        lines = "\n".join(f"{LETTERS[i]}) {opt}" for i, opt in enumerate(options))
        return template.format(question=question, options=lines)

    def record_text(self, record: dict) -> str:
        return self.text(record["question"], record["options"], record.get("answer_type"))

    def messages(self, record: dict, system: str | None = None) -> list[dict]:
        """Chat messages for one record; its images come first, in order, as in Qwen2-VL's examples.

        `system` (e.g. an explore option's tool instructions) replaces the prompt's own system turn.
        """
        system = system if system is not None else self.system
        msgs = [] if system is None else [{"role": "system", "content": system}]
        images = [{"type": "image"} for _ in range(1 + len(record.get("extra_images") or []))]
        msgs.append({"role": "user", "content": [*images, {"type": "text", "text": self.record_text(record)}]})
        return msgs
