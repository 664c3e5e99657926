"""Arrow schemas of the run directory's tables (see DESIGN.md's run-directory layout)."""

import pyarrow as pa

QUESTIONS = pa.schema([
    ("id", pa.string()),
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("question", pa.string()),
    ("options", pa.list_(pa.string())),
    ("answer", pa.int64()),  # index into options
])

PASSAGES = pa.schema([
    ("id", pa.string()),
    ("title", pa.string()),
    ("text", pa.string()),
])

RATIONALES = pa.schema([
    ("question_id", pa.string()),
    ("sample", pa.int64()),
    ("text", pa.string()),
    ("parsed_answer", pa.int64()),  # null when the rationale states no answer we can read
    ("consistent", pa.bool_()),  # parsed_answer == gold (or the verifier agreed)
    ("teacher", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("error", pa.string()),  # a row the backend could not produce after retries
])

PREDICTIONS = pa.schema([
    ("question_id", pa.string()),
    ("method", pa.string()),
    ("retrieval", pa.string()),
    ("passage_ids", pa.list_(pa.string())),
    ("generation", pa.string()),
    ("pred_index", pa.int64()),  # -1 when no answer could be read
    ("pred_letter_index", pa.int64()),
    ("pred_text_index", pa.int64()),
    ("answer", pa.int64()),
    ("correct", pa.bool_()),
])

REJECTED = pa.schema([
    ("stage", pa.string()),
    ("source", pa.string()),
    ("line", pa.int64()),
    ("reason", pa.string()),
    ("raw", pa.string()),
])
