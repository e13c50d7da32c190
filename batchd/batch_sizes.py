"""How large the next batch is, from the model's buckets and what each costs as served:
how many queued requests it takes, and whether to wait a little for those on their way
to fill a bucket. Pure arithmetic over BucketCosts (batchd.estimates): the batcher asks,
and the tests ask without a worker. Standard library only."""

from __future__ import annotations

from collections.abc import Sequence

from batchd.estimates import BucketCosts
from batchd.scheduler import smallest_bucket


class BatchSizes:
    """The batch sizes a model's worker chooses: `bucket_sizes` ascending, the largest at
    least `max_batch_size`, priced by `costs`."""

    def __init__(self, bucket_sizes: Sequence[int], max_batch_size: int, costs: BucketCosts,
                 fill_buckets: bool = True) -> None:
        self.bucket_sizes = tuple(sorted(set(bucket_sizes)))
        self.max_batch_size = max_batch_size
        self.costs = costs
        self.fill_buckets = fill_buckets

    def bucket_for(self, size: int) -> int:
        """The smallest configured bucket that holds `size` inputs."""
        return smallest_bucket(self.bucket_sizes, size)

    def count(self, queued: int) -> int:
        """How many queued requests the next batch takes.

        As many as fit, unless the largest bucket below them, filled exactly, costs less
        per request than padding up to the next bucket: with 20 queued and buckets 16
        and 32, running 16 now and 4 right after can beat computing 12 padding rows.
        The costs are warm-up's, corrected by the batches served (BucketCosts), so a
        warm-up timed on busy cores is set right within a few batches. Only that bucket,
        never a smaller one, so that even costs still wrong cut a batch by at most one
        bucket. Without warm-up's costs, as many as fit.
        """
        count = min(queued, self.max_batch_size)
        if count < 2 or not self.costs.seeded or count in self.bucket_sizes:
            return count
        below = [size for size in self.bucket_sizes if size < count]
        if not below:
            return count
        smaller = max(below)
        smaller_cost = self.costs.mean(smaller)
        padded_cost = self.costs.mean(self.bucket_for(count))
        if smaller_cost is None or padded_cost is None:
            return count
        return smaller if smaller_cost / smaller < padded_cost / count else count

    def fill_target(self, queued: int, expected: int) -> tuple[int, float] | None:
        """(bucket, seconds) when it pays to wait up to `seconds` for the `expected`
        requests on their way to fill `bucket`, the next bucket above the batch that
        `queued` would make now; None when dispatching now is the cheaper.

        Under a steady backlog, what queues while a batch computes is seldom a bucket:
        the next batch is cut to the bucket below or padded to the one above. When the
        requests that fill the bucket above are already being decoded, a short wait buys
        a batch that costs less per request. It pays while that batch, the model's idle
        wait counted as part of its cost, still costs less per request than the batch
        now: cost(now) / count * bucket - cost(bucket) at most. With the costs of
        warm-up and of the batches served; without them, or with `fill_buckets` off,
        never."""
        if (not self.fill_buckets or not expected or not self.costs.seeded
                or queued >= self.max_batch_size):
            return None
        count = self.count(queued)
        larger = [size for size in self.bucket_sizes if size > count]
        if count < 1 or not larger:
            return None
        target = min(min(larger), self.max_batch_size)
        if queued + expected < target:
            return None
        cost_now = self.costs.mean(self.bucket_for(count))
        cost_target = self.costs.mean(self.bucket_for(target))
        if cost_now is None or cost_target is None:
            return None
        worth_s = cost_now / count * target - cost_target
        return (target, worth_s) if worth_s > 0 else None


__all__ = ["BatchSizes"]
