"""Co-attentive selection over a user side and an item side (CAML's selector)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polytask.core.errors import DataError, InvalidParameterError, ShapeError
from polytask.models.encoders.base import ENCODERS
from polytask.text.layout import ExplainLayout


def co_attention(left: Tensor, right: Tensor, left_mask: Tensor, right_mask: Tensor, bilinear: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """Co-attentive selection weights: S = L M Rᵀ/√d, a_L = softmax(maxⱼ Sᵢⱼ), a_R = softmax(maxᵢ Sᵢⱼ).

    ``left`` (B, m, d), ``right`` (B, n, d), masks True on real entries; padding gets weight 0 and
    is left out of the max-pooling. Each row's weights sum to 1 on each side (Tay et al., KDD
    2018, eq. 3–5, the selector CAML builds on; softmax in place of their Gumbel-softmax). The
    1/√d scaling (of scaled dot-product attention) is ours: without it the scores grow in
    training until the softmax saturates and the selector stops learning."""
    scores = torch.einsum("bid,de,bje->bij", left, bilinear, right) / left.shape[-1] ** 0.5
    neg = torch.finfo(scores.dtype).min
    both = left_mask[:, :, None] & right_mask[:, None, :]
    scores = scores.masked_fill(~both, neg)
    left_weights = torch.softmax(scores.max(2).values.masked_fill(~left_mask, neg), dim=1)
    right_weights = torch.softmax(scores.max(1).values.masked_fill(~right_mask, neg), dim=1)
    return left_weights, right_weights


@ENCODERS.register("co_attention")
class CoAttention(nn.Module):
    """CAML's hierarchical co-attentive selector (Chen, Wang, Xie, Wu, Bu, Wang & Chen,
    "Co-Attentive Multi-Task Learning for Explainable Recommendation", IJCAI 2019), on one id row.

    User side: the profile ids, uₚ = ReLU(W_u E_p(idₚ)). Item side: each history review k as the
    masked mean of its word embeddings, rₖ = ReLU(W_r mean E_w(words of k)), and each concept word
    m as cₘ = E_w(conceptₘ). Review level: co-attention (:func:`co_attention`) between {uₚ} and {rₖ}
    gives weights a^u (over the profile) and a^r (over the reviews), each summing to 1; concept
    level: co-attention between {uₚ + r̄} (the profile read in the light of the selected reviews,
    r̄ = Σ aᵏʳ rₖ) and {cₘ} gives b^u and b^c. z = ReLU(W [ū; r̄; ū′; c̄; ū ⊙ r̄]) with ū = Σ a^u u,
    ū′ = Σ b^u u, c̄ = Σ b^c c: what the rating head and the generator head both read.

    ``selection(x)`` returns the four weight vectors and the concept ids (the concept-relevance
    term of ``caml`` reads b^c).

    Bad input: a row narrower than the layout, ids outside a part's vocabulary (part, row,
    position, range), a row with no item review or no concept: one DataError each.

    Departures
    ----------
    - Soft selection: softmax weights, where CAML (after MPCN) selects with Gumbel-softmax
      pointers; the weights are what the tests check sum to 1, and what an explanation shows.
    - One selector (CAML and MPCN use several pointers and combine them).
    - The concept level reads the item's concept list conditioned on the selected reviews through
      r̄, instead of the concepts of the selected reviews only; and the user side has no reviews
      or concepts here (the bundled data have no user history: see ``clothing_explain``), so the
      profile vectors stand in for both.
    - Reviews are bags of word embeddings (CAML's NBOW option; it also offers a CNN).
    """

    def __init__(self, *, vocab_size: int, profile_vocab_size: int, reviews: int, review_length: int, concepts: int,
                 profile: int, target_length: int = 0, embedding_dim: int = 64, out_features: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        for key, value, low in (("vocab_size", vocab_size, 2), ("profile_vocab_size", profile_vocab_size, 2),
                                ("reviews", reviews, 1), ("review_length", review_length, 1), ("concepts", concepts, 1),
                                ("profile", profile, 1), ("target_length", target_length, 0),
                                ("embedding_dim", embedding_dim, 1), ("out_features", out_features, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidParameterError(f"`{key}` of encoder `co_attention` must be an int >= {low}; found {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise InvalidParameterError(f"`dropout` of encoder `co_attention` must be in [0, 1); found {dropout!r}")
        self.layout = ExplainLayout(reviews, review_length, concepts, profile, target_length)
        self.vocab_size, self.profile_vocab_size, self.out_features = vocab_size, profile_vocab_size, out_features
        d = embedding_dim
        self.words = nn.Embedding(vocab_size, d, padding_idx=0)
        self.profile_embedding = nn.Embedding(profile_vocab_size, d, padding_idx=0)
        self.user_projection = nn.Sequential(nn.Linear(d, d), nn.ReLU())
        self.review_projection = nn.Sequential(nn.Linear(d, d), nn.ReLU())
        self.review_affinity = nn.Parameter(torch.eye(d) + 0.01 * torch.randn(d, d))
        self.concept_affinity = nn.Parameter(torch.eye(d) + 0.01 * torch.randn(d, d))
        self.output = nn.Sequential(nn.Linear(5 * d, out_features), nn.ReLU(), nn.Dropout(dropout))
        for table in (self.words, self.profile_embedding):  # small initial vectors: unsaturated attention at the start
            nn.init.normal_(table.weight, std=0.3)
            with torch.no_grad():
                table.weight[0].zero_()

    # ----------------------------------------------------------------------------- the input row
    def split(self, x: Tensor) -> dict[str, Tensor]:
        """The parts of the id rows, checked: 'item reviews' (B, K, L), 'item concepts' (B, M),
        'user profile' (B, P), 'explanation' (B, T)."""
        layout = self.layout
        if x.dim() != 2 or x.shape[1] != layout.width:
            raise ShapeError(f"encoder `co_attention` reads rows of {layout.width} ids ({layout.reviews} reviews × "
                             f"{layout.review_length} words, {layout.concepts} concepts, {layout.profile} profile ids, "
                             f"{layout.target_length} explanation ids); found shape {tuple(x.shape)}")
        if x.is_floating_point():
            if not torch.equal(x, x.round()):
                raise DataError("encoder `co_attention` reads integer ids; found non-integer values")
            x = x.long()
        parts = {name: x[:, a:b] for name, (a, b) in layout.parts.items()}
        for name, size in (("item reviews", self.vocab_size), ("item concepts", self.vocab_size),
                           ("user profile", self.profile_vocab_size)):
            ids = parts[name]
            wrong = (ids < 0) | (ids >= size)
            if wrong.any():
                row, position = (int(v) for v in wrong.nonzero()[0])
                raise DataError(f"encoder `co_attention`: {name}, row {row}, position {position} holds id "
                                f"{int(ids[row, position])}; expected an id in [0, {size - 1}]")
        parts["item reviews"] = parts["item reviews"].reshape(len(x), layout.reviews, layout.review_length)
        for name, present in (("item reviews", parts["item reviews"].ne(0).any(2)), ("item concepts", parts["item concepts"].ne(0)),
                              ("user profile", parts["user profile"].ne(0))):
            empty = ~present.any(1)
            if empty.any():
                raise DataError(f"encoder `co_attention`: row {int(empty.nonzero()[0])} has no {name} (all ids 0); expected at "
                                f"least one (the loader drops items without other reviews)")
        return parts

    def _select(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        parts = self.split(x)
        reviews, concepts, profile = parts["item reviews"], parts["item concepts"], parts["user profile"]
        word_mask = reviews.ne(0)
        counts = word_mask.sum(2, keepdim=True).clamp(min=1)
        review_vectors = self.review_projection((self.words(reviews) * word_mask[..., None]).sum(2) / counts)
        review_mask = word_mask.any(2)
        users = self.user_projection(self.profile_embedding(profile))
        user_mask = profile.ne(0)
        a_user, a_review = co_attention(users, review_vectors, user_mask, review_mask, self.review_affinity)
        user_summary = torch.einsum("bp,bpd->bd", a_user, users)
        review_summary = torch.einsum("bk,bkd->bd", a_review, review_vectors)
        concept_vectors = self.words(concepts)
        concept_mask = concepts.ne(0)
        b_user, b_concept = co_attention(users + review_summary[:, None], concept_vectors, user_mask, concept_mask,
                                         self.concept_affinity)
        user_concept = torch.einsum("bp,bpd->bd", b_user, users)
        concept_summary = torch.einsum("bm,bmd->bd", b_concept, concept_vectors)
        z = self.output(torch.cat([user_summary, review_summary, user_concept, concept_summary,
                                   user_summary * review_summary], dim=1))
        return z, {"user_reviews": a_user, "item_reviews": a_review, "user_concepts": b_user, "item_concepts": b_concept,
                   "concept_ids": concepts, "explanation": parts["explanation"]}

    def forward(self, x: Tensor) -> Tensor:
        return self._select(x)[0]

    def encode_with_selection(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """z and the selection: weights over the profile and the reviews ('user_reviews',
        'item_reviews'), over the profile and the concepts ('user_concepts', 'item_concepts'), each
        row summing to 1, the 'concept_ids' and the teacher-forcing 'explanation' ids."""
        return self._select(x)

    @torch.no_grad()
    def selection(self, x: Tensor) -> dict[str, Tensor]:
        return self._select(x)[1]
