//! GGUF metadata values.

use anyhow::{bail, Result};

pub const T_U8: u32 = 0;
pub const T_I8: u32 = 1;
pub const T_U16: u32 = 2;
pub const T_I16: u32 = 3;
pub const T_U32: u32 = 4;
pub const T_I32: u32 = 5;
pub const T_F32: u32 = 6;
pub const T_BOOL: u32 = 7;
pub const T_STRING: u32 = 8;
pub const T_ARRAY: u32 = 9;
pub const T_U64: u32 = 10;
pub const T_I64: u32 = 11;
pub const T_F64: u32 = 12;

/// A decoded metadata value. Arrays keep their element type so that a value
/// can be re-encoded exactly.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(u32, Vec<Value>),
    /// An array of fixed-size scalars (element type, little-endian bytes as
    /// in the file): as compact in memory as on disk, where a `Vec<Value>`
    /// would take 32 bytes per one-byte element.
    ScalarArray(u32, Vec<u8>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// Fixed byte size of a scalar type; `None` for strings and arrays.
pub fn scalar_size(ty: u32) -> Result<Option<u64>> {
    Ok(Some(match ty {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 => 8,
        T_STRING | T_ARRAY => return Ok(None),
        other => bail!("unknown metadata value type {other}"),
    }))
}

impl Value {
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => T_U8,
            Value::I8(_) => T_I8,
            Value::U16(_) => T_U16,
            Value::I16(_) => T_I16,
            Value::U32(_) => T_U32,
            Value::I32(_) => T_I32,
            Value::F32(_) => T_F32,
            Value::Bool(_) => T_BOOL,
            Value::String(_) => T_STRING,
            Value::Array(..) | Value::ScalarArray(..) => T_ARRAY,
            Value::U64(_) => T_U64,
            Value::I64(_) => T_I64,
            Value::F64(_) => T_F64,
        }
    }

    /// Integer value of any integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Appends the encoded value (without its type tag) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.extend(v.to_le_bytes()),
            Value::U16(v) => out.extend(v.to_le_bytes()),
            Value::I16(v) => out.extend(v.to_le_bytes()),
            Value::U32(v) => out.extend(v.to_le_bytes()),
            Value::I32(v) => out.extend(v.to_le_bytes()),
            Value::F32(v) => out.extend(v.to_le_bytes()),
            Value::Bool(v) => out.push(*v as u8),
            Value::String(s) => encode_str(s, out),
            Value::Array(ty, items) => {
                out.extend(ty.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    item.encode(out);
                }
            }
            Value::ScalarArray(ty, bytes) => {
                let size = scalar_size(*ty).ok().flatten().unwrap_or(1).max(1);
                out.extend(ty.to_le_bytes());
                out.extend((bytes.len() as u64 / size).to_le_bytes());
                out.extend(bytes);
            }
            Value::U64(v) => out.extend(v.to_le_bytes()),
            Value::I64(v) => out.extend(v.to_le_bytes()),
            Value::F64(v) => out.extend(v.to_le_bytes()),
        }
    }

    /// Decodes one fixed-size scalar of type `ty` from its bytes.
    pub fn scalar_from_le(ty: u32, b: &[u8]) -> Option<Value> {
        let arr = |n: usize| b.get(..n);
        Some(match ty {
            T_U8 => Value::U8(*b.first()?),
            T_I8 => Value::I8(*b.first()? as i8),
            T_BOOL => Value::Bool(*b.first()? != 0),
            T_U16 => Value::U16(u16::from_le_bytes(arr(2)?.try_into().ok()?)),
            T_I16 => Value::I16(i16::from_le_bytes(arr(2)?.try_into().ok()?)),
            T_U32 => Value::U32(u32::from_le_bytes(arr(4)?.try_into().ok()?)),
            T_I32 => Value::I32(i32::from_le_bytes(arr(4)?.try_into().ok()?)),
            T_F32 => Value::F32(f32::from_le_bytes(arr(4)?.try_into().ok()?)),
            T_U64 => Value::U64(u64::from_le_bytes(arr(8)?.try_into().ok()?)),
            T_I64 => Value::I64(i64::from_le_bytes(arr(8)?.try_into().ok()?)),
            T_F64 => Value::F64(f64::from_le_bytes(arr(8)?.try_into().ok()?)),
            _ => return None,
        })
    }

    /// Short human-readable form; long arrays are summarised.
    pub fn display_short(&self) -> String {
        match self {
            Value::String(s) if s.chars().count() > 60 => {
                format!("{:?}…", s.chars().take(60).collect::<String>())
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(_, items) if items.len() > 8 => format!("[{} items]", items.len()),
            Value::Array(_, items) => {
                let parts: Vec<String> = items.iter().map(Value::display_short).collect();
                format!("[{}]", parts.join(", "))
            }
            Value::ScalarArray(ty, bytes) => {
                let size = scalar_size(*ty).ok().flatten().unwrap_or(1).max(1) as usize;
                if bytes.len() / size > 8 {
                    return format!("[{} items]", bytes.len() / size);
                }
                let parts: Vec<String> = bytes
                    .chunks(size)
                    .filter_map(|b| Value::scalar_from_le(*ty, b))
                    .map(|v| v.display_short())
                    .collect();
                format!("[{}]", parts.join(", "))
            }
            Value::U8(v) => v.to_string(),
            Value::I8(v) => v.to_string(),
            Value::U16(v) => v.to_string(),
            Value::I16(v) => v.to_string(),
            Value::U32(v) => v.to_string(),
            Value::I32(v) => v.to_string(),
            Value::F32(v) => v.to_string(),
            Value::Bool(v) => v.to_string(),
            Value::U64(v) => v.to_string(),
            Value::I64(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
        }
    }
}

pub fn encode_str(s: &str, out: &mut Vec<u8>) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}
