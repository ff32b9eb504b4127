"""Turn a VQA record into chat messages: the MedVLM-R1 instruction (arXiv 2502.19634), as config.

The same builder formats the tiny model's warm-start data and every training/eval prompt, so
the model is always asked the question the way it was taught to answer it.
"""

from __future__ import annotations

from medvr.data.schema import LETTERS


class PromptBuilder:
    """Formats `question` + lettered `options` with an instruction into a Qwen-style chat."""

    def __init__(self, template: str, system: str | None = None):
        self.template = template
        self.system = system

    def text(self, question: str, options: list[str]) -> str:
        lines = "\n".join(f"{LETTERS[i]}) {opt}" for i, opt in enumerate(options))
        return self.template.format(question=question, options=lines)

    def messages(self, record: dict) -> list[dict]:
        """Chat messages for one record; the image comes first, as in Qwen2-VL's examples."""
        msgs = [] if self.system is None else [{"role": "system", "content": self.system}]
        msgs.append(
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": self.text(record["question"], record["options"])},
                ],
            }
        )
        return msgs
