//! Readers for the two files `llama-imatrix` writes, giving the importances
//! `llama-quantize` would pass to ggml (its `load_imatrix` and
//! `load_legacy_imatrix`):
//!
//! - GGUF (`general.type` = "imatrix"): per weight `W`, an F32 tensor
//!   `W.in_sum2` of `n_per_row × n_mat` summed squared inputs and an F32
//!   tensor `W.counts` of `n_mat` token counts; importance = in_sum2 / count,
//!   per matrix (expert). As in `llama-quantize`, an expert that never saw a
//!   token (count 0) gets importance 1; an entry with no count at all is an
//!   error. Other tensors (`W.in_sum`) are ignored.
//! - legacy `.dat`: `i32 n_entries`, then per entry `i32 len, name, i32
//!   ncall, i32 nval, f32[nval]` (the mean times ncall), then optionally `i32
//!   last_call` and `i32 len, dataset name`. Importance = value / ncall.
//!
//! Every count is checked against the bytes left before anything is
//! allocated; the file's name is in every error.

use super::Imatrix;
use crate::ffi::GgmlType;
use crate::gguf::GgufFile;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

const SUMS: &str = ".in_sum2";
const COUNTS: &str = ".counts";

impl Imatrix {
    /// Reads an importance matrix written by `llama-imatrix`, in either form
    /// (told apart by the GGUF magic). Its source is `file:<file name>`.
    pub fn read(path: &Path) -> Result<Imatrix> {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let source = format!("file:{name}");
        let what = || format!("importance matrix {}", path.display());
        let mut magic = [0u8; 4];
        let is_gguf = {
            use std::io::Read;
            let mut f =
                std::fs::File::open(path).with_context(|| format!("cannot open {}", what()))?;
            f.read(&mut magic)
                .with_context(|| format!("cannot read {}", what()))?
                == 4
                && &magic == crate::gguf::GGUF_MAGIC
        };
        if is_gguf {
            let file = GgufFile::open(path).with_context(what)?;
            Imatrix::from_gguf(&file, source).with_context(what)
        } else {
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", what()))?;
            Imatrix::parse_legacy(&bytes, source)
                .with_context(|| format!("{} (legacy .dat form)", what()))
        }
    }

    /// The GGUF form, from a parsed file.
    pub fn from_gguf(file: &GgufFile, source: String) -> Result<Imatrix> {
        match file.get("general.type") {
            Some(v) if v.as_str() == Some("imatrix") => {}
            Some(v) => bail!(
                "general.type is {}, not \"imatrix\" (is this a model rather than an importance matrix?)",
                v.display_short()
            ),
            None => bail!("no general.type \"imatrix\" (is this a model rather than an importance matrix?)"),
        }
        // Pair `W.in_sum2` with `W.counts`, in name order for stable errors.
        let mut pairs: BTreeMap<&str, (Option<usize>, Option<usize>)> = BTreeMap::new();
        for (i, t) in file.tensors.iter().enumerate() {
            if let Some(w) = t.name.strip_suffix(SUMS) {
                pairs.entry(w).or_default().0 = Some(i);
            } else if let Some(w) = t.name.strip_suffix(COUNTS) {
                pairs.entry(w).or_default().1 = Some(i);
            }
        }
        if pairs.is_empty() {
            bail!("it holds no {SUMS}/{COUNTS} tensors");
        }
        let mut m = Imatrix::new(source);
        for (weight, pair) in pairs {
            let (Some(s), Some(c)) = pair else {
                bail!(
                    "{weight} has {} without {}",
                    if pair.0.is_some() { SUMS } else { COUNTS },
                    if pair.0.is_some() { COUNTS } else { SUMS }
                );
            };
            let (sums_t, counts_t) = (&file.tensors[s], &file.tensors[c]);
            for t in [sums_t, counts_t] {
                if t.ty != GgmlType::F32 {
                    bail!("{} is {}, expected F32", t.name, t.ty);
                }
            }
            let row_len = sums_t.row_len() as usize;
            let n_mat = sums_t.n_rows() as usize;
            if counts_t.n_elements() as usize != n_mat {
                bail!(
                    "{weight}: {} holds {} counts for {n_mat} matrices ({} is {})",
                    counts_t.name,
                    counts_t.n_elements(),
                    sums_t.name,
                    sums_t.shape_string()
                );
            }
            let sums = f32s(file.tensor_data(sums_t));
            let counts = f32s(file.tensor_data(counts_t));
            if let Some(c) = counts.iter().find(|c| !c.is_finite() || **c < 0.0) {
                bail!("{weight}: count {c} is negative or not finite");
            }
            if counts.iter().all(|&c| c == 0.0) {
                bail!("{weight}: every count is zero (it never saw an input)");
            }
            check_values(weight, &sums)?;
            let mut values = sums;
            for (row, &count) in values.chunks_mut(row_len).zip(&counts) {
                if count > 0.0 {
                    row.iter_mut().for_each(|v| *v /= count);
                } else {
                    // An expert no token was routed to: llama-quantize uses 1.
                    row.fill(1.0);
                }
            }
            m.insert(weight, values);
        }
        Ok(m)
    }

    /// The legacy `.dat` form.
    pub fn parse_legacy(bytes: &[u8], source: String) -> Result<Imatrix> {
        let mut c = Reader { buf: bytes, pos: 0 };
        let n_entries = c.i32("the entry count")?;
        // Each entry takes at least 17 bytes (a one-byte name, one value).
        if n_entries < 1 || n_entries as usize > c.left() / 17 {
            bail!(
                "it claims {n_entries} entries; a {}-byte file holds 1 to {}",
                bytes.len(),
                c.left() / 17
            );
        }
        let mut m = Imatrix::new(source);
        for i in 0..n_entries as usize {
            let at = c.pos;
            let len = c.i32("a name length")?;
            if len < 1 || len as usize > c.left() {
                bail!("entry {i} (byte {at}): name length {len} is out of range");
            }
            let name = std::str::from_utf8(c.take(len as usize, "a name")?)
                .map_err(|_| anyhow!("entry {i} (byte {at}): the name is not UTF-8"))?;
            if name.contains('\0') {
                bail!("entry {i} (byte {at}): the name holds a NUL byte");
            }
            let ncall = c
                .i32("a call count")
                .with_context(|| format!("entry {name}"))?;
            let nval = c
                .i32("a value count")
                .with_context(|| format!("entry {name}"))?;
            if ncall < 1 {
                bail!("{name}: call count {ncall} (must be at least 1)");
            }
            if nval < 1 || nval as usize > c.left() / 4 {
                bail!("{name}: {nval} values, but {} bytes are left", c.left());
            }
            let values = f32s(c.take(nval as usize * 4, "values")?);
            check_values(name, &values)?;
            if m.get(name).is_some() {
                bail!("{name} appears twice");
            }
            m.insert(name, values.iter().map(|v| v / ncall as f32).collect());
        }
        // Optional trailer: the chunk count, then the dataset's name.
        if c.left() > 0 {
            c.i32("the chunk count after the entries")?;
            if c.left() > 0 {
                let len = c.i32("the dataset name's length")?;
                if len < 0 || len as usize != c.left() {
                    bail!(
                        "dataset name length {len} does not match the {} bytes left (trailing garbage?)",
                        c.left()
                    );
                }
            }
        }
        Ok(m)
    }
}

/// Sums of squares are finite and non-negative, or the file is damaged.
fn check_values(name: &str, values: &[f32]) -> Result<()> {
    if let Some((i, v)) = values
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite() || **v < 0.0)
    {
        bail!("{name}: value {i} is {v} (must be finite and non-negative)");
    }
    Ok(())
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect()
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            bail!(
                "truncated: {what} at byte {} needs {n} bytes, {} are left",
                self.pos,
                self.left()
            );
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn i32(&mut self, what: &str) -> Result<i32> {
        Ok(i32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
}
