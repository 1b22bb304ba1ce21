//! GGUF metadata values: the 13 value types of the GGUF spec (v2/v3), owned.
//!
//! Arrays are homogeneous and flat: like llama.cpp's `gguf.cpp`, an array of arrays is rejected.

use std::fmt;

/// The value type ids of the GGUF spec (`gguf_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Bytes of one element in the file; strings take at least their 8-byte length.
    pub fn min_size(self) -> usize {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }

    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A flat, homogeneous array value.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Array {
    pub fn elem_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Integer elements as i128 (lossless for every integer type); `None` for float, bool and string arrays.
    pub fn integers(&self) -> Option<Vec<i128>> {
        Some(match self {
            Array::U8(v) => v.iter().map(|x| *x as i128).collect(),
            Array::I8(v) => v.iter().map(|x| *x as i128).collect(),
            Array::U16(v) => v.iter().map(|x| *x as i128).collect(),
            Array::I16(v) => v.iter().map(|x| *x as i128).collect(),
            Array::U32(v) => v.iter().map(|x| *x as i128).collect(),
            Array::I32(v) => v.iter().map(|x| *x as i128).collect(),
            Array::U64(v) => v.iter().map(|x| *x as i128).collect(),
            Array::I64(v) => v.iter().map(|x| *x as i128).collect(),
            _ => return None,
        })
    }

    /// Elements as JSON values; at most `limit` of them.
    pub fn to_json(&self, limit: usize) -> Vec<serde_json::Value> {
        use serde_json::json;
        fn take<T: Clone>(v: &[T], limit: usize) -> impl Iterator<Item = T> + '_ {
            v.iter().take(limit).cloned()
        }
        match self {
            Array::U8(v) => take(v, limit).map(|x| json!(x)).collect(),
            Array::I8(v) => take(v, limit).map(|x| json!(x)).collect(),
            Array::U16(v) => take(v, limit).map(|x| json!(x)).collect(),
            Array::I16(v) => take(v, limit).map(|x| json!(x)).collect(),
            Array::U32(v) => take(v, limit).map(|x| json!(x)).collect(),
            Array::I32(v) => take(v, limit).map(|x| json!(x)).collect(),
            Array::F32(v) => take(v, limit).map(f32_json).collect(),
            Array::Bool(v) => take(v, limit).map(|x| json!(x)).collect(),
            Array::String(v) => take(v, limit).map(|x| json!(x)).collect(),
            Array::U64(v) => take(v, limit).map(|x| json!(x)).collect(),
            Array::I64(v) => take(v, limit).map(|x| json!(x)).collect(),
            Array::F64(v) => take(v, limit).map(|x| json!(x)).collect(),
        }
    }
}

/// An f32 as the shortest decimal that reads back to the same f32 ("0.1", not "0.10000000149011612").
fn f32_json(x: f32) -> serde_json::Value {
    format!("{x}")
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

/// One metadata value.
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
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// "u32", or "array[string]" for arrays: what error messages call the type.
    pub fn type_name(&self) -> String {
        match self {
            Value::Array(a) => format!("array[{}]", a.elem_type()),
            v => v.value_type().name().to_string(),
        }
    }

    /// The value of any integer type, lossless.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match self {
            Value::U8(x) => *x as i128,
            Value::I8(x) => *x as i128,
            Value::U16(x) => *x as i128,
            Value::I16(x) => *x as i128,
            Value::U32(x) => *x as i128,
            Value::I32(x) => *x as i128,
            Value::U64(x) => *x as i128,
            Value::I64(x) => *x as i128,
            _ => return None,
        })
    }

    /// JSON form; arrays longer than `array_limit` keep their first `array_limit` elements followed
    /// by a string "… N more".
    pub fn to_json(&self, array_limit: usize) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::U8(x) => json!(x),
            Value::I8(x) => json!(x),
            Value::U16(x) => json!(x),
            Value::I16(x) => json!(x),
            Value::U32(x) => json!(x),
            Value::I32(x) => json!(x),
            Value::F32(x) => f32_json(*x),
            Value::Bool(x) => json!(x),
            Value::String(x) => json!(x),
            Value::U64(x) => json!(x),
            Value::I64(x) => json!(x),
            Value::F64(x) => json!(x),
            Value::Array(a) => {
                let mut items = a.to_json(array_limit);
                if a.len() > array_limit {
                    items.push(json!(format!("… {} more", a.len() - array_limit)));
                }
                serde_json::Value::Array(items)
            }
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::U32(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::I32(v)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::U64(v)
    }
}
impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::F32(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<Array> for Value {
    fn from(a: Array) -> Self {
        Value::Array(a)
    }
}
