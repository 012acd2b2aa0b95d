"""A recipe, from YAML to the settings every other part reads.

``loading`` reads a recipe (``extends``, ``key=value`` overrides) and validates it into a ``Recipe``;
``schema`` types plain data against dataclasses (alignkit's sections and TRL / peft configs alike);
``settings/`` holds the sections as plain data; ``library`` lists and copies the shipped recipes.
"""
