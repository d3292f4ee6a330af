"""Data: tokenizers, document sources, the embedded corpus, and the grain input pipeline.

Public entry points (imported from their modules, so `import elmjax.data` stays cheap):
  elmjax.data.pipeline.make_train_iterator / make_eval_iterator  -- packed batches
  elmjax.data.tokenizer_choice.load_tokenizer                     -- the run's tokenizer
  elmjax.data.token_store.TokenStoreWriter / TokenStoreSource     -- pre-tokenised stores
  elmjax.data.chat.encode_conversation / jinja_template           -- chat template, assistant mask
  elmjax.data.preference.make_preference_iterator                 -- DPO pair batches
"""
