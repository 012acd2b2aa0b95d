"""``alignkit plan``: ``planner`` (the run's model on the meta device, parameter counts, data rows and
steps, the cheapest change that fits), ``memory`` (the bytes per device), ``activations`` (activation
memory traced on the meta device) and ``report`` (the plan as text or JSON)."""
