//! Strict GGUF header parsing over a memory map.

use super::value::{self, scalar_size, Value};
use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::ffi::GgmlType;
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use std::collections::HashSet;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One metadata key/value pair and where its bytes lie in the file.
#[derive(Debug)]
pub struct KvEntry {
    pub key: String,
    pub value: Value,
    /// The whole entry (key, type tag, value) in the file.
    pub raw: Range<usize>,
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) axis.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Elements in one row (the contiguous axis).
    pub fn row_len(&self) -> u64 {
        self.dims[0]
    }
    pub fn n_rows(&self) -> u64 {
        self.dims[1..].iter().product()
    }
    pub fn shape_string(&self) -> String {
        let dims: Vec<String> = self.dims.iter().map(u64::to_string).collect();
        dims.join(" x ")
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub file: File,
    pub mmap: Mmap,
    pub version: u32,
    pub kvs: Vec<KvEntry>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Bytes of all tensor infos.
    pub tensor_info_range: Range<usize>,
    /// Absolute offset of the data section.
    pub data_start: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        if n > self.remaining() as u64 {
            bail!("truncated at byte {} (wanted {n} more bytes)", self.pos);
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N as u64)?.try_into().expect("length checked"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| anyhow!("invalid UTF-8 string at byte {}", self.pos))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            value::T_U8 => Value::U8(self.array::<1>()?[0]),
            value::T_I8 => Value::I8(i8::from_le_bytes(self.array()?)),
            value::T_U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            value::T_I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            value::T_U32 => Value::U32(self.u32()?),
            value::T_I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            value::T_F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            value::T_BOOL => Value::Bool(self.array::<1>()?[0] != 0),
            value::T_STRING => Value::String(self.string()?),
            value::T_U64 => Value::U64(self.u64()?),
            value::T_I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            value::T_F64 => Value::F64(f64::from_le_bytes(self.array()?)),
            value::T_ARRAY => {
                if depth > 0 {
                    bail!("nested arrays are not supported");
                }
                let elem_ty = self.u32()?;
                let n = self.u64()?;
                // Every element needs at least this many bytes, so an absurd
                // count fails here instead of in an allocation.
                let min_elem = scalar_size(elem_ty)?.unwrap_or(8);
                if n.checked_mul(min_elem)
                    .is_none_or(|b| b > self.remaining() as u64)
                {
                    bail!("array of {n} elements runs past the end of the file");
                }
                if let Some(size) = scalar_size(elem_ty)? {
                    // Checked above: n * size fits in what is left.
                    let bytes = self.take(n * size)?;
                    return Ok(Value::ScalarArray(elem_ty, bytes.to_vec()));
                }
                // Strings (8 bytes at least each, checked above): n fits,
                // so the vector is reserved once and never grows.
                let mut items = Vec::with_capacity(bounded_capacity::<u64>(n, self.remaining()));
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                Value::Array(elem_ty, items)
            }
            other => bail!("unknown metadata value type {other}"),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only map; a file truncated under us would fault, as in
        // every mmap-based GGUF reader, llama.cpp included.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        Self::parse(path, file, mmap)
            .with_context(|| format!("{} is not a valid GGUF file", path.display()))
    }

    fn parse(path: &Path, file: File, mmap: Mmap) -> Result<GgufFile> {
        let mut c = Cursor { buf: &mmap, pos: 0 };
        let magic = c.take(4).map_err(|_| anyhow!("file too short"))?;
        if magic != GGUF_MAGIC {
            bail!("bad magic (not a GGUF file)");
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            bail!("unsupported GGUF version {version} (expected 2 or 3)");
        }
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;
        // Each KV needs at least 12 bytes and each tensor info at least 24.
        if n_kv
            .saturating_mul(12)
            .saturating_add(n_tensors.saturating_mul(24))
            > c.remaining() as u64
        {
            bail!("header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file can hold");
        }

        let mut kvs = Vec::with_capacity(bounded_capacity::<KvEntry>(n_kv, c.remaining()));
        let mut keys = HashSet::new();
        for i in 0..n_kv {
            let start = c.pos;
            let key = c.string().with_context(|| format!("metadata entry {i}"))?;
            let ty = c.u32()?;
            let value = c
                .value(ty, 0)
                .with_context(|| format!("metadata key {key}"))?;
            if !keys.insert(key.clone()) {
                bail!("duplicate metadata key {key}");
            }
            kvs.push(KvEntry {
                key,
                value,
                raw: start..c.pos,
            });
        }

        let alignment = match kvs.iter().find(|kv| kv.key == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(kv) => match kv.value {
                Value::U32(a) if a.is_power_of_two() => a.into(),
                ref v => bail!("general.alignment must be a power-of-two u32, found {v:?}"),
            },
        };

        let info_start = c.pos;
        let mut tensors =
            Vec::with_capacity(bounded_capacity::<TensorInfo>(n_tensors, c.remaining()));
        let mut names = HashSet::new();
        for i in 0..n_tensors {
            let name = c.string().with_context(|| format!("tensor info {i}"))?;
            let t = parse_tensor_info(&mut c, name.clone())
                .with_context(|| format!("tensor {name}"))?;
            if t.offset % alignment != 0 {
                bail!(
                    "tensor {name}: offset {} is not aligned to {alignment}",
                    t.offset
                );
            }
            if !names.insert(name.clone()) {
                bail!("duplicate tensor name {name}");
            }
            tensors.push(t);
        }
        let tensor_info_range = info_start..c.pos;
        let data_start = (c.pos as u64).next_multiple_of(alignment);
        let data_len = (mmap.len() as u64).saturating_sub(data_start);

        let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(tensors.len());
        for t in &tensors {
            let end = t.offset.checked_add(t.size).filter(|&e| e <= data_len).ok_or_else(|| {
                anyhow!(
                    "tensor {} ({} bytes at data offset {}) runs past the end of the file (truncated?)",
                    t.name,
                    t.size,
                    t.offset
                )
            })?;
            spans.push((t.offset, end, &t.name));
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                bail!("tensors {} and {} overlap", w[0].2, w[1].2);
            }
        }

        Ok(GgufFile {
            path: path.to_path_buf(),
            file,
            mmap,
            version,
            kvs,
            tensors,
            alignment,
            tensor_info_range,
            data_start,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kvs.iter().find(|kv| kv.key == key).map(|kv| &kv.value)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// `{arch}.{suffix}` as an integer, e.g. `block_count`.
    pub fn arch_u64(&self, suffix: &str) -> Option<u64> {
        self.get_u64(&format!("{}.{suffix}", self.architecture()?))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_start + t.offset) as usize;
        &self.mmap[start..start + t.size as usize]
    }

    /// Tells the kernel that a tensor's pages will not be read again, so a
    /// long streaming pass does not keep the whole model resident.
    pub fn release(&self, t: &TensorInfo) {
        let start = (self.data_start + t.offset) as usize;
        #[cfg(unix)]
        {
            let page = 4096;
            let aligned = start / page * page;
            let len = t.size as usize + (start - aligned);
            // SAFETY: read-only shared file mapping, so dropped pages are
            // simply re-read from the file if touched again.
            let _ = unsafe {
                self.mmap
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, aligned, len)
            };
        }
        #[cfg(not(unix))]
        let _ = start;
    }

    /// Reads a small F32/F16/BF16 tensor (e.g. a norm weight) as f32.
    pub fn read_f32(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let mut out = vec![0f32; t.n_elements() as usize];
        crate::ffi::dequantize_rows(t.ty, self.tensor_data(t), &mut out)
            .with_context(|| format!("reading {}", t.name))?;
        Ok(out)
    }
}

/// Capacity to reserve for `claimed` items: never more bytes of memory than
/// the file has left, so a forged count cannot force a large allocation
/// before the items it claims have been read.
fn bounded_capacity<T>(claimed: u64, remaining: usize) -> usize {
    let fit = remaining / std::mem::size_of::<T>().max(1);
    claimed.min(fit as u64) as usize
}

fn parse_tensor_info(c: &mut Cursor, name: String) -> Result<TensorInfo> {
    let n_dims = c.u32()?;
    if !(1..=4).contains(&n_dims) {
        bail!("{n_dims} dimensions (ggml allows 1 to 4)");
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(c.u64()?);
    }
    let ty = GgmlType(c.u32()?);
    let offset = c.u64()?;
    if !ty.is_known() {
        bail!("unknown ggml type id {}", ty.0);
    }
    // A zero-sized axis has no rows to rewrite and breaks row chunking;
    // llama.cpp's reader rejects it too.
    if let Some(axis) = dims.iter().position(|&d| d == 0) {
        bail!("dimension {axis} is zero");
    }
    let n_elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    if n_elements.is_none_or(|n| n > i64::MAX as u64) {
        bail!("element count overflows");
    }
    let n_rows = dims[1..]
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| anyhow!("dimensions overflow"))?;
    let row = ty.row_bytes(dims[0]).ok_or_else(|| {
        anyhow!(
            "row of {} elements is not a whole number of {ty} blocks",
            dims[0]
        )
    })?;
    let size = row
        .checked_mul(n_rows)
        .ok_or_else(|| anyhow!("size overflows"))?;
    Ok(TensorInfo {
        name,
        dims,
        ty,
        offset,
        size,
    })
}
