"""Models: ``modeling`` loads a model and tokenizer (dtype, 4/8-bit, chat template, run dirs), ``adapters``
builds the peft config of a recipe's ``adapter`` section, ``merge`` folds a run's adapter into its base."""
