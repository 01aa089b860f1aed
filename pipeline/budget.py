"""``--max-cost``: stop before spend passes the cap, never after.

Spend is tracked live from the usage each answer reports, priced with the same
table and rule as ``pipeline report``. A request in flight has not reported yet, so
it holds a reservation: its prompt estimate plus the most it may write (its
``max_completion_tokens`` / ``max_tokens``, else the largest completion seen so far
with a margin). A request is sent only if spent + reserved + its own reservation
stays within the cap. A request that does not fit only because of the holds in flight
waits for them to settle; one that does not fit with nothing in flight stops the run
(exit 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline.errors import BudgetExceeded as BudgetExceeded
from pipeline.pricing import Price, PriceTable, find_price
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

    def _price(self, model: str, response_model: str | None = None) -> Price:
        today = datetime.now(UTC)
        price = find_price(self.prices, model, self.provider, today, response_model=response_model)
        if price is None:
            raise BudgetExceeded(
                f"--max-cost is set but model '{model}' has no price in {self.prices.path}; "
                "add it with --pricing FILE"
            )
        return price

    def reserve(self, job: Job) -> Reservation:
        """Hold the most this request may cost, or raise BudgetExceeded."""
        price = self._price(job.model)
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

    def settle(self, reservation: Reservation, model: str, usage: Usage | None) -> float:
        """Release the hold and book what the server reported. Returns the cost booked.

        ``usage`` is None when no answer came (nothing billed). An answer whose usage
        the server did not report was billed all the same: it books its whole hold,
        the most it could have cost, so an unknown never lets spend pass the cap.
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
        price = self._price(model)
        cost = price.cost(usage.prompt_tokens, usage.cached_tokens or 0, completion)
        self.spent += cost
        return cost
