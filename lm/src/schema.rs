//! The prepared-data table: one row per conversation, tokenized.
//!
//! | column     | type          | meaning                                                  |
//! |------------|---------------|----------------------------------------------------------|
//! | id         | string        | `<source>-<record index>`, stable across runs            |
//! | source     | string        | asset name from data/sources.toml                        |
//! | split      | string        | `train`, `val` (training data) or `eval` (evaluation)     |
//! | system     | string?       | system prompt of the record, if it has one               |
//! | user       | string        | the user's turn                                          |
//! | assistant  | string?       | the reference reply, if the data has one                 |
//! | label      | string?       | category / type the data set gives (e.g. XSTest type)    |
//! | input_ids  | list<int32>   | rendered conversation (prompt, then reply if any)        |
//! | prompt_len | int32         | tokens before the reply: the loss counts ids[prompt_len..]|
//! | n_tokens   | int32         | len(input_ids)                                           |
//! | truncated  | bool          | the reply was cut at the maximum sequence length         |

use anyhow::{anyhow, bail, Context, Result};
use arrow::array::{
    Array, ArrayRef, BooleanArray, Int32Array, Int32Builder, ListArray, ListBuilder, RecordBatch,
    StringArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use std::path::Path;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedRow {
    pub id: String,
    pub source: String,
    pub split: String,
    pub system: Option<String>,
    pub user: String,
    pub assistant: Option<String>,
    pub label: Option<String>,
    pub input_ids: Vec<u32>,
    pub prompt_len: u32,
    pub truncated: bool,
}

impl PreparedRow {
    /// The prompt's tokens: what a model reads before it replies.
    pub fn prompt_ids(&self) -> &[u32] {
        &self.input_ids[..self.prompt_len as usize]
    }

    /// `(ids, prompt_len)`: the row as a training example (see `batch::Batch::new`).
    pub fn example(&self) -> (&[u32], usize) {
        (&self.input_ids, self.prompt_len as usize)
    }

    /// Token positions the loss counts (the reply), as a 0/1 mask over `input_ids`.
    pub fn loss_mask(&self) -> Vec<u8> {
        (0..self.input_ids.len())
            .map(|i| u8::from(i >= self.prompt_len as usize))
            .collect()
    }
}

pub fn schema() -> Schema {
    let s = |name| Field::new(name, DataType::Utf8, false);
    let s_opt = |name| Field::new(name, DataType::Utf8, true);
    Schema::new(vec![
        s("id"),
        s("source"),
        s("split"),
        s_opt("system"),
        s("user"),
        s_opt("assistant"),
        s_opt("label"),
        Field::new(
            "input_ids",
            DataType::List(Arc::new(Field::new("item", DataType::Int32, false))),
            false,
        ),
        Field::new("prompt_len", DataType::Int32, false),
        Field::new("n_tokens", DataType::Int32, false),
        Field::new("truncated", DataType::Boolean, false),
    ])
}

fn to_batch(rows: &[PreparedRow]) -> Result<RecordBatch> {
    let strings = |f: fn(&PreparedRow) -> Option<&str>| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    };
    let mut ids = ListBuilder::new(Int32Builder::new()).with_field(Arc::new(Field::new(
        "item",
        DataType::Int32,
        false,
    )));
    for r in rows {
        for &t in &r.input_ids {
            ids.values()
                .append_value(i32::try_from(t).context("token id above i32::MAX")?);
        }
        ids.append(true);
    }
    let int = |f: fn(&PreparedRow) -> usize| -> ArrayRef {
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| f(r) as i32),
        ))
    };
    let columns: Vec<ArrayRef> = vec![
        strings(|r| Some(&r.id)),
        strings(|r| Some(&r.source)),
        strings(|r| Some(&r.split)),
        strings(|r| r.system.as_deref()),
        strings(|r| Some(&r.user)),
        strings(|r| r.assistant.as_deref()),
        strings(|r| r.label.as_deref()),
        Arc::new(ids.finish()),
        int(|r| r.prompt_len as usize),
        int(|r| r.input_ids.len()),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.truncated))
                .collect::<BooleanArray>(),
        ),
    ];
    Ok(RecordBatch::try_new(Arc::new(schema()), columns)?)
}

/// Rows in a Parquet row group: what a writer holds before it writes them out (a set of
/// millions of rows is written in groups of this size, with memory bounded by one).
pub const ROW_GROUP_ROWS: usize = 65_536;

/// Prepared rows written to an open file batch by batch (snappy, row groups of
/// [`ROW_GROUP_ROWS`]). The same rows give the same bytes however they are batched within a
/// row group.
pub struct RowWriter<W: std::io::Write + Send> {
    writer: ArrowWriter<W>,
}

impl<W: std::io::Write + Send> RowWriter<W> {
    pub fn new(out: W) -> Result<Self> {
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        Ok(Self {
            writer: ArrowWriter::try_new(out, Arc::new(schema()), Some(props))?,
        })
    }

    pub fn write(&mut self, rows: &[PreparedRow]) -> Result<()> {
        if !rows.is_empty() {
            self.writer.write(&to_batch(rows)?)?;
        }
        Ok(())
    }

    /// Writes the footer; the file is complete.
    pub fn close(self) -> Result<()> {
        self.writer.close()?;
        Ok(())
    }
}

/// Writes rows as one Parquet file (snappy), atomically. The same rows give the same bytes.
pub fn write_parquet(path: &Path, rows: &[PreparedRow]) -> Result<()> {
    crate::fsutil::write_atomic(path, |file| {
        let mut w = RowWriter::new(file)?;
        w.write(rows)?;
        w.close()
    })
    .with_context(|| format!("cannot write {}", path.display()))
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a T> {
    let col = batch.column_by_name(name).ok_or_else(|| {
        anyhow!(
            "{}: column '{name}' is missing (not a basin prepared file?)",
            path.display()
        )
    })?;
    col.as_any().downcast_ref::<T>().ok_or_else(|| {
        anyhow!(
            "{}: column '{name}' has type {}, expected the one in basin_lm::schema",
            path.display(),
            col.data_type()
        )
    })
}

/// Reads a prepared Parquet file back into rows, checking the schema.
pub fn read_parquet(path: &Path) -> Result<Vec<PreparedRow>> {
    let mut rows = Vec::new();
    for_each_batch(path, |batch| {
        rows.extend(batch);
        Ok(())
    })?;
    Ok(rows)
}

/// Reads a prepared Parquet file batch by batch (memory bounded by a batch), checking the
/// schema; `f` gets each batch's rows in file order.
pub fn for_each_batch(
    path: &Path,
    mut f: impl FnMut(Vec<PreparedRow>) -> Result<()>,
) -> Result<()> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open prepared data {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?
        .build()?;
    for batch in reader {
        let mut rows = Vec::with_capacity(batch.as_ref().map_or(0, |b| b.num_rows()));
        let batch = batch.with_context(|| format!("{}: cannot decode", path.display()))?;
        let text = |name| column::<StringArray>(&batch, name, path);
        let (id, source, split, system, user, assistant, label) = (
            text("id")?,
            text("source")?,
            text("split")?,
            text("system")?,
            text("user")?,
            text("assistant")?,
            text("label")?,
        );
        let input_ids = column::<ListArray>(&batch, "input_ids", path)?;
        let prompt_len = column::<Int32Array>(&batch, "prompt_len", path)?;
        let n_tokens = column::<Int32Array>(&batch, "n_tokens", path)?;
        let truncated = column::<BooleanArray>(&batch, "truncated", path)?;
        let opt = |a: &StringArray, i: usize| (!a.is_null(i)).then(|| a.value(i).to_string());
        for i in 0..batch.num_rows() {
            let ids_array = input_ids.value(i);
            let ids = ids_array
                .as_any()
                .downcast_ref::<Int32Array>()
                .ok_or_else(|| anyhow!("{}: input_ids items are not int32", path.display()))?;
            let ids: Vec<u32> = ids.values().iter().map(|&t| t as u32).collect();
            if ids.len() != n_tokens.value(i) as usize {
                bail!(
                    "{}: row {i}: n_tokens = {} but input_ids has {} ids",
                    path.display(),
                    n_tokens.value(i),
                    ids.len()
                );
            }
            rows.push(PreparedRow {
                id: id.value(i).to_string(),
                source: source.value(i).to_string(),
                split: split.value(i).to_string(),
                system: opt(system, i),
                user: user.value(i).to_string(),
                assistant: opt(assistant, i),
                label: opt(label, i),
                input_ids: ids,
                prompt_len: prompt_len.value(i) as u32,
                truncated: truncated.value(i),
            });
        }
        f(rows)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: u32, reply: Option<&str>) -> PreparedRow {
        PreparedRow {
            id: format!("set-{i}"),
            source: "set".into(),
            split: "train".into(),
            system: i.is_multiple_of(2).then(|| "sys".to_string()),
            user: format!("question {i} ✓"),
            assistant: reply.map(str::to_string),
            label: None,
            input_ids: (0..i + 3).collect(),
            prompt_len: 2,
            truncated: i == 1,
        }
    }

    #[test]
    fn round_trip_and_deterministic_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let rows = vec![row(0, Some("a")), row(1, None), row(2, Some("c"))];
        let (a, b) = (dir.path().join("a.parquet"), dir.path().join("b.parquet"));
        write_parquet(&a, &rows).unwrap();
        write_parquet(&b, &rows).unwrap();
        assert_eq!(read_parquet(&a).unwrap(), rows);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(rows[0].loss_mask(), vec![0, 0, 1]);
        assert_eq!(rows[0].prompt_ids(), &[0, 1]);
        assert_eq!(rows[0].example(), (&[0u32, 1, 2][..], 2));
    }

    #[test]
    fn reading_a_non_parquet_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.parquet");
        std::fs::write(&p, b"not parquet").unwrap();
        let err = read_parquet(&p).unwrap_err();
        assert!(format!("{err:#}").contains("x.parquet"), "{err:#}");
    }
}
