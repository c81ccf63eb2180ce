"""Which served models an input goes to: the first routing rule that matches it, and that
rule's models from the repository's contracts, checked against the input's kind and
dimensions."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.convert import images as convert
from pipeline.core import routing
from pipeline.core.contract import ModelContract
from pipeline.core.errors import InputError, ModelNotFoundError, NoModelError
from pipeline.core.routing import Route, SeriesFacts


@dataclass
class Models:
    """The served models' contracts, and which of them an input goes to."""

    contracts: dict[str, ModelContract]

    def choose(
        self, routes: tuple[Route, ...], facts: SeriesFacts, image: convert.LoadedImage
    ) -> tuple[Route, list[ModelContract]]:
        """The first matching rule and its models; NoModelError says why no rule matched."""
        route = self.route(routes, facts)
        return route, self.for_route(route, image)

    @staticmethod
    def route(routes: tuple[Route, ...], facts: SeriesFacts) -> Route:
        """The first matching rule; NoModelError says why no rule matched."""
        decision = routing.decide(routes, facts)
        if decision.route is None:
            raise NoModelError(f"no routing rule matches this input ({why_not(decision)})")
        return decision.route

    def for_route(self, route: Route, image: convert.LoadedImage) -> list[ModelContract]:
        chosen = []
        for name in route.models:
            contract = self.contracts.get(name)
            if contract is None:
                raise ModelNotFoundError(
                    f"route {route.name!r} names model {name!r}, which is not in the model "
                    f"repository (models: {', '.join(self.contracts) or 'none'})"
                )
            if image.kind not in contract.accepts or contract.spatial_dims != image.spatial_dims:
                raise InputError(
                    f"route {route.name!r} sends a {image.spatial_dims}D {image.kind} input to "
                    f"{name}, which takes {contract.spatial_dims}D "
                    f"{'/'.join(k.value for k in contract.accepts)}"
                )
            chosen.append(contract)
        return chosen


def why_not(decision: routing.Decision) -> str:
    """Why no rule matched, rule by rule, in one line."""
    return "; ".join(f"{name}: {', '.join(why)}" for name, why in decision.why_not.items())
