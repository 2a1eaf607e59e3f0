"""Everything that shards or wraps a model: planner, sharders, DMP."""
