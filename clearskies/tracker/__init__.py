"""The tracker service: registry (pure), HTTP resource, and twistd plugin entry."""
