"""The input row of explainable recommendation: item reviews, concepts, user profile, explanation ids."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExplainLayout:
    """Where each part lies in a row of integer ids (the column order of ``x``).

    ``reviews × review_length`` item-review word ids (a review of only 0 is padding), ``concepts``
    item concept word ids (0 = padding), ``profile`` user-profile ids (0 = padding), then
    ``target_length`` teacher-forcing ids of the explanation (read only by a generator head in
    training; zeros are fine elsewhere)."""

    reviews: int
    review_length: int
    concepts: int
    profile: int
    target_length: int = 0

    @property
    def parts(self) -> dict[str, tuple[int, int]]:
        start, out = 0, {}
        for name, width in (("item reviews", self.reviews * self.review_length), ("item concepts", self.concepts),
                            ("user profile", self.profile), ("explanation", self.target_length)):
            out[name] = (start, start + width)
            start += width
        return out

    @property
    def width(self) -> int:
        return self.parts["explanation"][1]
