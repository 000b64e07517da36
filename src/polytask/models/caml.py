"""CAML: a co-attentive selector shared by rating heads and an explanation generator."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.core.task import PAD_ID, TEXT_KINDS, VISION_KINDS, Task
from polytask.models._common import check_rows, encoder_width, positive_int, trainable
from polytask.models.base import ARCHITECTURES, MultiTaskModel
from polytask.models.encoders.co_attention import CoAttention
from polytask.models.heads import layer_sizes, mlp_layers
from polytask.text.generator import GRUGenerator
from polytask.text.vocabulary import decode_ids

if TYPE_CHECKING:
    from polytask.text.vocabulary import Vocabulary


def concept_relevance(logits: Tensor, target: Tensor, concept_ids: Tensor, concept_weights: Tensor) -> Tensor:
    """Σₘ bₘ · −log maxₜ p(yₜ = conceptₘ), averaged over the batch (CAML's concept relevance term).

    ``logits`` (B, T, V) teacher-forced, ``target`` (B, T) (positions that are padding do not
    count in the max), ``concept_ids`` (B, M) (0 = padding), ``concept_weights`` (B, M) the
    selector's weights over the concepts."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    index = concept_ids[:, None, :].expand(-1, probabilities.shape[1], -1)
    at_concepts = probabilities.gather(2, index)  # (B, T, M)
    at_concepts = at_concepts.masked_fill(target.eq(PAD_ID)[..., None], 0.0)
    best = at_concepts.max(1).values  # (B, M)
    terms = -torch.log(best + 1e-7) * concept_weights * concept_ids.ne(PAD_ID)
    return terms.sum(1).mean()


@ARCHITECTURES.register("caml")
class CAML(MultiTaskModel):
    """Co-Attentive Multi-task Learning (Chen, Wang, Xie, Wu, Bu, Wang & Chen, "Co-Attentive
    Multi-Task Learning for Explainable Recommendation", IJCAI 2019).

    Encoder–selector–decoder: the ``co_attention`` encoder selects, by co-attention, the item
    reviews and concepts that matter for this user (weights summing to 1 on each side) and
    gives z; every non-text task has an MLP head on z (rating: regression, recommended: binary),
    and the one ``generation`` task a :class:`~polytask.text.GRUGenerator` on the same z, so
    the explanation is generated from what drove the prediction. The loss is the tasks' own
    (MSE, BCE, token cross-entropy with teacher forcing) plus, with ``concept_weight`` λ_c > 0,
    the concept relevance term λ_c Σₘ bₘ·(−log maxₜ p(yₜ = conceptₘ)) (:func:`concept_relevance`),
    which pushes the generator to say the concepts the selector chose; it comes through
    :meth:`extra_loss`, from the latest training forward pass.

    Without a generation task (and with λ_c = 0) any encoder serves, and ``caml`` is hard sharing
    with MLP heads; a generation task needs ``co_attention``.

    Teacher forcing reads the explanation ids from the encoder's input row (its layout's last
    ``target_length`` columns; the selector never reads them). In eval mode the generator runs
    free (greedy), so validation metrics and ``predict`` never see those columns; :meth:`explain`
    decodes strings with greedy or beam search.

    θ: the encoder. Private to each task: its head. z: the encoder output (batch, D).

    Departures
    ----------
    - Soft co-attention, one selector, NBOW reviews (see the encoder's Departures).
    - λ_c weights the concepts by the selector's soft weights bₘ; CAML sums over the concepts
      its Gumbel pointers select (hard picks), mean-aggregated in its reference code.
    - The rating is not fed to the decoder (CAML's ``feed_rating`` option is off here) and the
      generator does not attend over the concepts (they reach it through z).
    """

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], *, concept_weight: float = 0.0,
                 head_hidden: Sequence[int] = (64,), head_dropout: float = 0.0, decoder_hidden: int = 128,
                 decoder_embedding: int = 64) -> None:
        super().__init__(tasks)
        if isinstance(concept_weight, bool) or not isinstance(concept_weight, (int, float)) \
                or not math.isfinite(concept_weight) or concept_weight < 0:
            raise InvalidParameterError(f"`concept_weight` of `caml` must be a finite number >= 0; found {concept_weight!r}")
        positive_int(decoder_hidden, "decoder_hidden", "caml")
        positive_int(decoder_embedding, "decoder_embedding", "caml")
        wrong = [t.name for t in tasks if t.kind in VISION_KINDS]
        if wrong:
            raise InvalidParameterError(f"`caml` predicts per user-item pair; task(s) {wrong} are per-pixel or detection")
        generation = [t for t in tasks if t.kind in TEXT_KINDS]
        if len(generation) > 1:
            raise InvalidParameterError(f"`caml` generates one explanation; found generation tasks {[t.name for t in generation]}")
        if (generation or concept_weight > 0) and not isinstance(encoder, CoAttention):
            why = f"generation task '{generation[0].name}'" if generation else "`concept_weight` > 0"
            raise InvalidParameterError(f"`caml` with a {why} needs the `co_attention` encoder (encoder: {{name: "
                                        f"co_attention, ...}}: the explanation ids and the concepts are in its rows); found "
                                        f"{type(encoder).__name__}")
        target_length = encoder.layout.target_length if isinstance(encoder, CoAttention) else 0
        if generation and target_length < 2:
            raise InvalidParameterError(f"generation task '{generation[0].name}' needs the encoder's `target_length` (the "
                                        f"explanation columns of the input) >= 2; found {target_length}")
        if generation and generation[0].num_classes != encoder.vocab_size:  # type: ignore[union-attr]
            raise InvalidParameterError(f"generation task '{generation[0].name}' has a vocabulary of {generation[0].num_classes}"
                                        f" ids; the encoder's concepts are ids of a vocabulary of {encoder.vocab_size}: the "
                                        "concept-relevance term needs them to be one vocabulary")
        hidden = layer_sizes(head_hidden, "head_hidden", "caml")
        dim = encoder_width(encoder, "caml")
        self.encoder, self.representation_dim = encoder, dim
        self.concept_weight = float(concept_weight)
        self.generation_task = generation[0].name if generation else None
        self.heads = nn.ModuleDict({
            t.name: GRUGenerator(dim, t.num_classes, max_length=target_length, embedding_dim=decoder_embedding,
                                 hidden_size=decoder_hidden, dropout=head_dropout)  # type: ignore[arg-type]
            if t.kind in TEXT_KINDS else mlp_layers(dim, hidden, t.out_features, dropout=head_dropout) for t in tasks})
        self._selection: dict[str, Tensor] = {}
        self._penalty: Tensor | None = None

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        if isinstance(self.encoder, CoAttention):
            z, self._selection = self.encoder.encode_with_selection(x)
            return z
        return check_rows(self.encoder(x), self.representation_dim, f"encoder {type(self.encoder).__name__}")

    def decode(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = self.task_names if tasks is None else tasks
        out: dict[str, Tensor] = {}
        for t in names:
            if t == self.generation_task:
                teacher = self._selection.get("explanation")
                out[t] = self.tasks[t].prepare_prediction(self.heads[t](z, teacher))
                if self.training and torch.is_grad_enabled() and self.concept_weight > 0 and teacher is not None:
                    self._penalty = concept_relevance(out[t], teacher, self._selection["concept_ids"],
                                                      self._selection["item_concepts"])
            else:
                out[t] = self.tasks[t].prepare_prediction(self.heads[t](z))
        return out

    def extra_loss(self) -> Tensor | None:
        """λ_c × the concept relevance term of the latest training forward pass (then forgotten)."""
        penalty, self._penalty = self._penalty, None
        return None if penalty is None else self.concept_weight * penalty

    def attention_weights(self, x: Tensor) -> dict[str, Tensor]:
        """The selector's weights per row: 'user_reviews', 'item_reviews', 'user_concepts',
        'item_concepts' (each row sums to 1), with the 'concept_ids' they weigh."""
        if not isinstance(self.encoder, CoAttention):
            raise InvalidParameterError(f"attention weights come from the `co_attention` encoder; this model's is "
                                        f"{type(self.encoder).__name__}")
        selection = self.encoder.selection(x)
        return {k: v for k, v in selection.items() if k != "explanation"}

    @torch.no_grad()
    def generate(self, x: Tensor, *, beam_size: int = 1, length_penalty: float = 1.0) -> Tensor:
        """Explanation ids (B, T): greedy at ``beam_size`` 1, else length-normalised beam search."""
        if self.generation_task is None:
            raise InvalidParameterError("this `caml` model has no generation task to explain with")
        was_training = self.training
        self.eval()
        try:
            return self.heads[self.generation_task].generate(self.encode(x), beam_size=beam_size,
                                                             length_penalty=length_penalty)
        finally:
            self.train(was_training)

    def explain(self, x: Tensor, vocabulary: Vocabulary, *, beam_size: int = 1, length_penalty: float = 1.0) -> list[str]:
        """The generated explanations as strings."""
        return decode_ids(self.generate(x, beam_size=beam_size, length_penalty=length_penalty), vocabulary)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from trainable(self.encoder.parameters())

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.heads[name].parameters()
