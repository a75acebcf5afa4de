"""The cloud sync service: model registry, fleet, staged rollouts."""
