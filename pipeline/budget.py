"""``--max-cost``: stop before spend passes the cap, never after.

Spend is tracked live from the usage each answer reports, priced with the same
table and rule as ``pipeline report``. A request in flight has not reported yet, so
it holds a reservation: its prompt estimate plus the most it may write (its
``max_completion_tokens`` / ``max_tokens``, else the largest completion seen so far
with a margin). A request is sent only if spent + reserved + its own reservation
stays within the cap. A request that does not fit only because of the holds in flight
waits for them to settle; one that does not fit with nothing in flight stops the run
(exit 3).

Prices are those of the service tier: a request is held at the tier it asks for (a
flex request at flex prices, one that fell back to the default tier at default ones;
``tier`` lets a Batch-API submission hold its lines at batch prices) and booked at the
tier the answer reports, as ``pipeline report`` prices it. A tier the table has no
price for is refused before sending like an unpriced model (never held at the default
tier's price), and an answer reported at an unpriced tier books its whole hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline.errors import BudgetExceeded as BudgetExceeded
from pipeline.pricing import Price, PriceTable, billed_tier, find_price
from pipeline.request import Job
from pipeline.wire import Usage

DEFAULT_COMPLETION_GUESS = 512  # tokens held per request before any answer is seen
MARGIN = 1.25  # over the largest completion seen, for requests with no max_tokens


@dataclass(slots=True)
class Reservation:
    amount: float


class Budget:
    def __init__(self, cap: float, prices: PriceTable, provider: str) -> None:
        self.cap = cap  # USD
        self.prices = prices
        self.provider = provider
        self.spent = 0.0  # USD reported by answers so far
        self.reserved = 0.0  # USD held by requests in flight
        self.holds = 0  # requests in flight holding part of ``reserved``
        self.largest_completion = 0  # tokens, for reservations without max_tokens

    # -- sharing one job's cap among processes (--shard, Ray workers) -----------------

    def share(self, parts: int) -> None:
        """Keep 1/``parts`` of the cap: one of ``parts`` processes that split a job."""
        self.cap /= parts

    def lease(self, amount: float) -> None:
        """Add ``amount`` USD leased from the job's budget (Ray) to this process's cap."""
        self.cap += amount

    def unspent(self, keep: float = 0.0) -> float:
        """USD of the cap neither spent nor held by requests in flight, beyond ``keep``."""
        return self.cap - self.spent - self.reserved - keep

    def give_back(self, amount: float) -> None:
        """Hand ``amount`` USD of the cap back to the job (it no longer counts here)."""
        self.cap -= amount

    def learn_completion(self, tokens: int) -> None:
        """A completion seen elsewhere in the job: reservations without max_tokens grow."""
        self.largest_completion = max(self.largest_completion, tokens)

    def _find(self, model: str, service_tier: str | None) -> Price | None:
        today = datetime.now(UTC)
        return find_price(self.prices, model, self.provider, today, service_tier=service_tier)

    def _price(self, model: str, service_tier: str | None = None) -> Price:
        price = self._find(model, service_tier)
        if price is None:
            tier = billed_tier(service_tier)
            at = f" at service tier '{tier}'" if tier else ""
            raise BudgetExceeded(
                f"--max-cost is set but model '{model}' has no price{at} in "
                f"{self.prices.path}; add it with --pricing FILE"
            )
        return price

    def reserve(self, job: Job, tier: str | None = None) -> Reservation:
        """Hold the most this request may cost, or raise BudgetExceeded. The price is
        that of ``tier`` if given, else of the tier the request asks for."""
        asked = job.body.get("service_tier")
        if tier is None and isinstance(asked, str):
            tier = asked
        price = self._price(job.model, tier)
        ceiling = job.completion_ceiling
        if ceiling is not None:
            completion = ceiling
        elif self.largest_completion:
            completion = int(self.largest_completion * MARGIN)
        else:
            completion = DEFAULT_COMPLETION_GUESS
        amount = price.cost(job.est_prompt_tokens, 0, completion)
        if self.spent + self.reserved + amount > self.cap:
            raise BudgetExceeded(
                f"budget: ${self.spent:.4f} spent and ${max(0.0, self.reserved):.4f} in "
                f"flight; the next request (up to ${amount:.4f}) would pass "
                f"--max-cost ${self.cap:g}",
                amount,
            )
        self.reserved += amount
        self.holds += 1
        return Reservation(amount)

    def settle(
        self,
        reservation: Reservation,
        model: str,
        usage: Usage | None,
        *,
        service_tier: str | None = None,
    ) -> float:
        """Release the hold and book what the server reported. Returns the cost booked.

        ``usage`` is None when no answer came (nothing billed). An answer whose usage
        the server did not report was billed all the same: it books its whole hold,
        the most it could have cost, so an unknown never lets spend pass the cap.
        ``service_tier`` is the tier the answer reports; one without a price books the
        whole hold too.
        """
        self.reserved -= reservation.amount
        self.holds -= 1
        if self.holds == 0:
            self.reserved = 0.0  # no float residue: nothing is in flight
        if usage is None:
            return 0.0
        if usage.prompt_tokens is None:
            self.spent += reservation.amount
            return reservation.amount
        completion = usage.completion_tokens or 0
        self.largest_completion = max(self.largest_completion, completion)
        price = self._find(model, service_tier)
        if price is None:
            self.spent += reservation.amount
            return reservation.amount
        cost = price.cost(usage.prompt_tokens, usage.cached_tokens or 0, completion)
        self.spent += cost
        return cost
