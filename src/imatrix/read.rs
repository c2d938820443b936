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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{encode_new, NewTensor, Value};

    fn le(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Weight name, its in_sum2 as n_mat rows of sums, its counts.
    type Entry<'a> = (&'a str, Vec<Vec<f32>>, Vec<f32>);

    /// An imatrix GGUF.
    fn gguf_bytes(general_type: &str, entries: &[Entry]) -> Vec<u8> {
        let data: Vec<(String, Vec<u64>, Vec<u8>)> = entries
            .iter()
            .flat_map(|(name, sums, counts)| {
                let row_len = sums[0].len() as u64;
                let flat: Vec<f32> = sums.concat();
                [
                    (
                        format!("{name}.in_sum2"),
                        vec![row_len, sums.len() as u64],
                        le(&flat),
                    ),
                    (
                        format!("{name}.counts"),
                        vec![1, counts.len() as u64],
                        le(counts),
                    ),
                ]
            })
            .collect();
        let tensors: Vec<NewTensor> = data
            .iter()
            .map(|(name, dims, bytes)| NewTensor {
                name: name.clone(),
                dims: dims.clone(),
                ty: GgmlType::F32,
                data: bytes,
            })
            .collect();
        let kvs = [
            (
                "general.type".to_string(),
                Value::String(general_type.into()),
            ),
            ("imatrix.chunk_count".to_string(), Value::U32(3)),
        ];
        encode_new(&kvs, &tensors)
    }

    fn read_bytes(name: &str, bytes: &[u8]) -> (tempfile::TempDir, Result<Imatrix>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let m = Imatrix::read(&path);
        (dir, m)
    }

    fn err(r: Result<Imatrix>) -> String {
        format!("{:#}", r.expect_err("should fail"))
    }

    /// A legacy entry: name, ncall, values.
    fn dat_entry(out: &mut Vec<u8>, name: &[u8], ncall: i32, values: &[f32]) {
        out.extend((name.len() as i32).to_le_bytes());
        out.extend(name);
        out.extend(ncall.to_le_bytes());
        out.extend((values.len() as i32).to_le_bytes());
        out.extend(le(values));
    }

    fn dat(entries: &[(&[u8], i32, &[f32])], trailer: Option<(i32, &[u8])>) -> Vec<u8> {
        let mut out = (entries.len() as i32).to_le_bytes().to_vec();
        for (name, ncall, values) in entries {
            dat_entry(&mut out, name, *ncall, values);
        }
        if let Some((last_call, dataset)) = trailer {
            out.extend(last_call.to_le_bytes());
            out.extend((dataset.len() as i32).to_le_bytes());
            out.extend(dataset);
        }
        out
    }

    #[test]
    fn gguf_form_is_sums_over_counts_per_matrix() {
        let bytes = gguf_bytes(
            "imatrix",
            &[
                (
                    "blk.0.attn_output.weight",
                    vec![vec![2.0, 4.0, 6.0, 8.0]],
                    vec![2.0],
                ),
                (
                    "blk.0.ffn_down_exps.weight",
                    vec![vec![3.0, 6.0], vec![5.0, 5.0], vec![0.0, 0.0]],
                    vec![3.0, 10.0, 0.0],
                ),
            ],
        );
        let (_dir, m) = read_bytes("m.imatrix.gguf", &bytes);
        let m = m.unwrap();
        assert_eq!(m.source, "file:m.imatrix.gguf");
        assert_eq!(m.len(), 2);
        assert_eq!(
            m.get("blk.0.attn_output.weight").unwrap(),
            [1.0, 2.0, 3.0, 4.0]
        );
        // The expert that saw no token gets 1, as llama-quantize does.
        assert_eq!(
            m.for_tensor("blk.0.ffn_down_exps.weight", 2, 3)
                .unwrap()
                .unwrap(),
            [1.0, 2.0, 0.5, 0.5, 1.0, 1.0]
        );
        assert!(m.for_tensor("blk.0.ffn_down_exps.weight", 4, 2).is_err());
    }

    #[test]
    fn legacy_form_is_values_over_ncall() {
        let bytes = dat(
            &[
                (b"blk.0.ffn_down.weight", 4, &[4.0, 8.0, 2.0]),
                (b"token_embd.weight", 1, &[0.5]),
            ],
            Some((10, b"calibration.txt")),
        );
        let (_dir, m) = read_bytes("legacy.dat", &bytes);
        let m = m.unwrap();
        assert_eq!(m.source, "file:legacy.dat");
        assert_eq!(m.get("blk.0.ffn_down.weight").unwrap(), [1.0, 2.0, 0.5]);
        assert_eq!(m.get("token_embd.weight").unwrap(), [0.5]);
        // The trailer is optional, and so is its dataset name.
        let entries: &[(&[u8], i32, &[f32])] = &[(b"w", 2, &[2.0])];
        assert!(Imatrix::parse_legacy(&dat(entries, None), "t".into()).is_ok());
        let mut only_count = dat(entries, None);
        only_count.extend(7i32.to_le_bytes());
        assert!(Imatrix::parse_legacy(&only_count, "t".into()).is_ok());
    }

    #[test]
    fn every_truncation_of_a_legacy_file_is_an_error() {
        let entries: &[(&[u8], i32, &[f32])] =
            &[(b"a.weight", 2, &[1.0, 2.0]), (b"b.weight", 1, &[3.0])];
        let full = dat(entries, Some((5, b"data.txt")));
        let body = dat(entries, None).len();
        for cut in 0..full.len() {
            let r = Imatrix::parse_legacy(&full[..cut], "t".into());
            // Valid prefixes: the entries alone, or followed by the chunk count.
            assert_eq!(
                r.is_ok(),
                cut == body || cut == body + 4,
                "cut at {cut}: {r:?}"
            );
        }
    }

    #[test]
    fn malformed_legacy_files_are_clean_errors() {
        let ok: &[f32] = &[1.0];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "truncated"),
            (0i32.to_le_bytes().to_vec(), "claims 0 entries"),
            (i32::MAX.to_le_bytes().to_vec(), "entries"),
            (dat(&[(b"w", 1, ok), (b"w", 1, ok)], None), "appears twice"),
            (dat(&[(b"\xff\xfe", 1, ok)], None), "not UTF-8"),
            (dat(&[(b"w\0x", 1, ok)], None), "NUL"),
            (dat(&[(b"w", 0, ok)], None), "call count 0"),
            (dat(&[(b"w", -3, ok)], None), "call count -3"),
            (dat(&[(b"w", 1, &[f32::NAN])], None), "NaN"),
            (dat(&[(b"w", 1, &[f32::INFINITY])], None), "inf"),
            (dat(&[(b"w", 1, &[-1.0])], None), "non-negative"),
            (
                dat(&[(b"w", 1, ok)], Some((1, b"x\n")))
                    .into_iter()
                    .chain([0u8; 3])
                    .collect(),
                "trailing",
            ),
        ];
        for (bytes, needle) in cases {
            let e = format!(
                "{:#}",
                Imatrix::parse_legacy(&bytes, "t".into()).unwrap_err()
            );
            assert!(e.contains(needle), "expected {needle:?} in {e:?}");
        }
        // A forged value count or name length is refused before allocating.
        let mut huge = dat(&[(b"w", 1, ok)], None);
        huge[4 + 4 + 1 + 4..4 + 4 + 1 + 8].copy_from_slice(&i32::MAX.to_le_bytes());
        assert!(format!(
            "{:#}",
            Imatrix::parse_legacy(&huge, "t".into()).unwrap_err()
        )
        .contains("values"));
        let mut long_name = dat(&[(b"w", 1, ok)], None);
        long_name[4..8].copy_from_slice(&1_000_000i32.to_le_bytes());
        assert!(format!(
            "{:#}",
            Imatrix::parse_legacy(&long_name, "t".into()).unwrap_err()
        )
        .contains("name length"));
    }

    #[test]
    fn malformed_gguf_files_are_clean_errors_naming_the_file() {
        let one = |sums: Vec<f32>, counts: Vec<f32>| vec![("w", vec![sums], counts)];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                gguf_bytes("model", &one(vec![1.0], vec![1.0])),
                "not \"imatrix\"",
            ),
            (gguf_bytes("imatrix", &[]), "no .in_sum2"),
            (
                gguf_bytes("imatrix", &one(vec![1.0], vec![-1.0])),
                "negative",
            ),
            (
                gguf_bytes("imatrix", &one(vec![1.0], vec![f32::NAN])),
                "not finite",
            ),
            (gguf_bytes("imatrix", &one(vec![1.0], vec![0.0])), "zero"),
            (
                gguf_bytes("imatrix", &one(vec![f32::NAN], vec![1.0])),
                "NaN",
            ),
            (
                gguf_bytes("imatrix", &one(vec![-2.0], vec![1.0])),
                "non-negative",
            ),
            (
                gguf_bytes("imatrix", &one(vec![1.0, 2.0], vec![1.0, 1.0])),
                "2 counts for 1 matrices",
            ),
        ];
        for (bytes, needle) in cases {
            let (dir, r) = read_bytes("bad.gguf", &bytes);
            let e = err(r);
            assert!(e.contains(needle), "expected {needle:?} in {e:?}");
            assert!(
                e.contains(&dir.path().join("bad.gguf").display().to_string()),
                "{e}"
            );
        }
        // A sums tensor without its counts.
        let mut bytes = gguf_bytes("imatrix", &one(vec![1.0], vec![1.0]));
        let at = bytes.windows(8).position(|w| w == b"w.counts").unwrap();
        bytes[at + 2..at + 8].copy_from_slice(b"xounts");
        let (_dir, r) = read_bytes("half.gguf", &bytes);
        assert!(err(r).contains("w has .in_sum2 without .counts"));
        // Truncated anywhere before the end of the last tensor (the last
        // 4 bytes of data, then padding to 32): an error, never a panic.
        let full = gguf_bytes("imatrix", &one(vec![1.0, 2.0], vec![1.0]));
        for cut in (0..full.len() - 28).step_by(3) {
            let (_dir, r) = read_bytes("cut.gguf", &full[..cut]);
            assert!(r.is_err(), "cut at {cut}");
        }
    }
}
