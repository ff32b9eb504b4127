"""Turn a VQA record into chat messages: the MedVLM-R1 instruction (arXiv 2502.19634), as config.

The same builder formats the tiny model's warm-start data and every training/eval prompt, so
the model is always asked the question the way it was taught to answer it.
"""

from __future__ import annotations

from medvr.data.schema import LETTERS


class PromptBuilder:
    """Formats `question` + lettered `options` with an instruction into a Qwen-style chat.

    It also holds the text of the zoom protocol (tool instructions and observation turns), so the
    tiny model's warm start and the zoom environment speak exactly the same language.
    """

    def __init__(
        self,
        template: str,
        system: str | None = None,
        zoom_system: str | None = None,
        observation: str | None = None,
        invalid_observation: str | None = None,
    ):
        self.template = template
        self.system = system
        self.zoom_system = zoom_system
        self.observation = observation
        self.invalid_observation = invalid_observation

    def text(self, question: str, options: list[str]) -> str:
        lines = "\n".join(f"{LETTERS[i]}) {opt}" for i, opt in enumerate(options))
        return self.template.format(question=question, options=lines)

    def messages(self, record: dict, system: str | None = None) -> list[dict]:
        """Chat messages for one record; the image comes first, as in Qwen2-VL's examples.

        `system` (e.g. an explore option's tool instructions) replaces the prompt's own system turn.
        """
        system = system if system is not None else self.system
        msgs = [] if system is None else [{"role": "system", "content": system}]
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
