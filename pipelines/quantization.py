"""Which quantisation a render needs: part of a loaded model's identity, torch-free.

A quantised base model is kept per (model, quantisation): the worker's Renderer compares this value
to decide whether its hot pipeline can serve a render, and an adapter refuses a render whose
quantisation is not the one it was loaded with.
"""

from __future__ import annotations

from dataclasses import dataclass

from previewd.spec import ModelSource, RenderSpec


@dataclass(frozen=True)
class Quantization:
    transformer: str | None = None
    """qtype of the transformer (`qfloat8`, `uint2`..`uint8`); None: full precision."""
    ara: str | None = None
    """Accuracy recovery adapter of a quantised transformer (local file or `user/repo/file`)."""
    text_encoder: str | None = None
    """qtype of the text encoder; None: full precision."""

    @classmethod
    def configured(cls, source: ModelSource) -> Quantization:
        """What the config asks for: its text-encoder setting only."""
        return cls(text_encoder=None if source.quantize_text_encoder == "none" else source.quantize_text_encoder)

    @classmethod
    def of(cls, spec: RenderSpec, source: ModelSource) -> Quantization:
        """The aitk profile renders as the run sampled (its `aitk` options; a text-encoder setting left
        open falls back to the configured one); the reference server never quantises the transformer."""
        configured = cls.configured(source)
        if spec.parity != "aitk":
            return configured
        options = spec.aitk
        if options.quantize_te is None:
            text_encoder = configured.text_encoder
        else:
            text_encoder = options.qtype_te if options.quantize_te else None
        return cls(transformer=options.qtype if options.quantize else None,
                   ara=options.ara if options.quantize else None, text_encoder=text_encoder)

    def refusals(self, spec: RenderSpec, source: ModelSource) -> list[str]:
        """Why a pipeline loaded with this quantisation cannot render `spec` (empty: it can)."""
        wanted = Quantization.of(spec, source)
        return [] if wanted == self else [f"quantization: this pipeline is loaded with {self.describe()}, the render "
                                          f"asks for {wanted.describe()}"]

    def describe(self) -> dict[str, str | None]:
        return {"transformer": self.transformer, "ara": self.ara, "text_encoder": self.text_encoder}
