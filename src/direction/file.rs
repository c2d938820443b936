//! The direction file: `{"direction": [n_embd floats], …the edit record,
//! …provenance}`.

use crate::edit::{EditPoint, EditRecord, EditVectors, RECORD_KEYS};
use crate::gguf::Value;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value as Json};
use std::path::Path;

pub struct DirectionFile {
    /// Under `direction`, `layer_directions` and `further_directions`.
    pub vectors: EditVectors,
    /// The edit it records (None: it records none, and applies the plain
    /// edit). A file that records part of one gets the rest at their defaults.
    pub edit: Option<EditRecord>,
    /// Every other key, kept as provenance.
    pub provenance: Map<String, Json>,
}

impl DirectionFile {
    pub fn read(path: &Path) -> Result<DirectionFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text)
            .with_context(|| format!("{} is not a valid direction file", path.display()))
    }

    pub fn parse(text: &str) -> Result<DirectionFile> {
        let json: Json = serde_json::from_str(text).context("invalid JSON")?;
        let Json::Object(mut map) = json else {
            bail!("expected a JSON object")
        };
        // A report (`--report`) holds the direction file as its "direction".
        if let Some(Json::Object(inner)) = map.get("direction") {
            if map.contains_key("verification") || map.contains_key("apply") {
                map = inner.clone();
            }
        }
        let vectors = take_vectors(&mut map)?;
        let recorded: Map<String, Json> = RECORD_KEYS
            .iter()
            .filter_map(|&k| map.remove(k).map(|v| (k.to_string(), v)))
            .collect();
        let edit = if recorded.is_empty() {
            None
        } else {
            let record: EditRecord = serde_json::from_value(Json::Object(recorded))
                .context("its edit (scale, weights, layer, …) is not a valid edit record")?;
            record.validate()?;
            Some(record)
        };
        let mut file = Self::new(vectors, map)?;
        file.edit = edit;
        Ok(file)
    }

    /// A direction file, provided every vector can be projected out
    /// ([`check_usable`]) and has the direction's length.
    pub fn new(vectors: EditVectors, provenance: Map<String, Json>) -> Result<DirectionFile> {
        check_vectors(&vectors)?;
        Ok(DirectionFile {
            vectors,
            edit: None,
            provenance,
        })
    }

    /// The provenance with the edit record's keys among it.
    fn keys(&self) -> Map<String, Json> {
        let mut map = self.provenance.clone();
        if let Some(Ok(Json::Object(edit))) = self.edit.as_ref().map(serde_json::to_value) {
            map.extend(edit);
        }
        map
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.to_value()).expect("serializable")
    }

    /// The file as a JSON object: direction, edit record and provenance.
    pub fn to_value(&self) -> Json {
        let mut map = self.keys();
        put_vectors(&self.vectors, &mut map);
        Json::Object(map)
    }

    /// The recorded edit, or the plain one where the file records none.
    pub fn recorded_edit(&self) -> EditRecord {
        self.edit.clone().unwrap_or_default()
    }

    /// The direction file of point `n` of the saved Pareto front (as the
    /// main command prints it): its direction and parametrization replace
    /// the chosen one's, everything else is kept.
    pub fn pick(&self, n: usize) -> Result<DirectionFile> {
        let front = match self.provenance.get("front") {
            Some(Json::Array(front)) if !front.is_empty() => front,
            _ => bail!("it holds no Pareto front to pick from (written by an older version, or with --trials 0)"),
        };
        let entry = front.get(n).with_context(|| {
            format!(
                "--pick {n}: the front has {} points (0 to {})",
                front.len(),
                front.len() - 1
            )
        })?;
        let point: EditPoint = serde_json::from_value(entry["point"].clone())
            .with_context(|| format!("front point {n} is not a valid edit point"))?;
        let Json::Object(mut keys) = entry.clone() else {
            bail!("front point {n} is not an object");
        };
        let mut picked = take_vectors(&mut keys)
            .and_then(|v| DirectionFile::new(v, self.provenance.clone()))
            .with_context(|| format!("front point {n} has no valid direction"))?;
        let edit = EditRecord::of(&point);
        edit.validate()?;
        picked.edit = Some(edit);
        Ok(picked)
    }

    /// Scalar provenance as GGUF metadata (`abliterate.<key>`); nested
    /// values (candidate tables, prompt lists) stay in the JSON only.
    pub fn provenance_kvs(&self) -> Vec<(String, Value)> {
        let mut kvs = Vec::new();
        for (k, v) in &self.keys() {
            let value = match v {
                Json::String(s) => Value::String(s.clone()),
                Json::Bool(b) => Value::Bool(*b),
                Json::Number(n) if n.is_i64() => Value::I64(n.as_i64().expect("i64")),
                Json::Number(n) => Value::F64(n.as_f64().unwrap_or(f64::NAN)),
                _ => continue,
            };
            kvs.push((k.clone(), value));
        }
        kvs
    }
}

/// A vector that can be projected out: not empty, every value finite (an
/// f32 overflow or a poisoned activation gives Inf/NaN) and a norm that is
/// finite and non-zero.
fn check_usable(direction: &[f32]) -> Result<()> {
    if direction.is_empty() {
        bail!("\"direction\" is empty");
    }
    if let Some(i) = direction.iter().position(|x| !x.is_finite()) {
        bail!(
            "\"direction\" holds a non-finite value ({} at index {i}); the model's activations may hold NaN/Inf",
            direction[i]
        );
    }
    if direction.iter().all(|&x| x == 0.0) {
        bail!("\"direction\" is all zeros");
    }
    let norm = direction
        .iter()
        .map(|&x| f64::from(x).powi(2))
        .sum::<f64>()
        .sqrt();
    if !(norm.is_finite() && norm > 1e-30) {
        bail!("\"direction\" has norm {norm:e}; it cannot be normalised");
    }
    Ok(())
}

/// The edit's vectors under their keys, as a direction file and each
/// front point hold them (the lists only where not empty). Each value is
/// written as the shortest decimal that reads back as the same f32.
pub fn put_vectors(vectors: &EditVectors, map: &mut Map<String, Json>) {
    // Through serde, an f32 keeps its own shortest spelling; `Json::from`
    // would widen it to f64 first, and spell it in 17 digits.
    map.insert("direction".into(), json_of(&vectors.direction));
    for (key, list) in [
        ("layer_directions", &vectors.layer_directions),
        ("further_directions", &vectors.further_directions),
    ] {
        if !list.is_empty() {
            map.insert(key.into(), json_of(list));
        }
    }
}

/// Checked vectors are finite, so serde has no value it cannot write.
fn json_of<T: serde::Serialize>(x: &T) -> Json {
    serde_json::to_value(x).unwrap_or(Json::Null)
}

/// The edit's vectors, taken out of `map` (the lists absent or null: none).
fn take_vectors(map: &mut Map<String, Json>) -> Result<EditVectors> {
    let Some(Json::Array(values)) = map.remove("direction") else {
        bail!("missing \"direction\": [numbers]");
    };
    let direction = numbers(&values).context("\"direction\" must contain only numbers")?;
    Ok(EditVectors {
        direction,
        layer_directions: vector_list(map, "layer_directions")?,
        further_directions: vector_list(map, "further_directions")?,
    })
}

/// A list of vectors under `key` (absent or null: none).
fn vector_list(map: &mut Map<String, Json>, key: &str) -> Result<Vec<Vec<f32>>> {
    match map.remove(key) {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(vectors)) => vectors
            .iter()
            .map(|l| l.as_array().and_then(|v| numbers(v)))
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("\"{key}\" must be a list of lists of numbers")),
        Some(_) => bail!("\"{key}\" must be a list of lists of numbers"),
    }
}

/// Every vector usable, and each list's vectors as long as `direction`.
fn check_vectors(v: &EditVectors) -> Result<()> {
    check_usable(&v.direction)?;
    let layers = (v.layer_directions.iter().enumerate())
        .map(|(l, d)| (format!("the direction of layer {l}"), d));
    let further = (v.further_directions.iter().enumerate())
        .map(|(k, d)| (format!("further direction {}", k + 1), d));
    for (name, d) in layers.chain(further) {
        if d.len() != v.direction.len() {
            bail!(
                "{name} has {} values, \"direction\" {}",
                d.len(),
                v.direction.len()
            );
        }
        check_usable(d).with_context(|| name)?;
    }
    Ok(())
}

fn numbers(values: &[Json]) -> Option<Vec<f32>> {
    values
        .iter()
        .map(|v| v.as_f64().map(|x| x as f32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_provenance_and_rejects_bad_vectors() {
        let f = DirectionFile::parse(r#"{"direction":[1,0.5],"layer":12,"model":"x"}"#).unwrap();
        assert_eq!(f.vectors.direction, vec![1.0, 0.5]);
        let kvs = f.provenance_kvs();
        assert!(kvs.contains(&("layer".into(), Value::I64(12))));
        assert!(kvs.contains(&("model".into(), Value::String("x".into()))));
        let round = DirectionFile::parse(&f.to_json()).unwrap();
        assert_eq!(round.vectors.direction, f.vectors.direction);
        for bad in [
            r#"[1,2]"#,
            r#"{"direction":[]}"#,
            r#"{"direction":[0,0]}"#,
            r#"{"direction":[1e-45,0]}"#,
            r#"{"direction":[1e39,1]}"#,
            r#"{"direction":[1,null]}"#,
            r#"{"direction":["a"]}"#,
            r#"{"dir":[1]}"#,
            "{",
        ] {
            assert!(DirectionFile::parse(bad).is_err(), "{bad}");
        }
    }

    /// Values are written in f32's shortest spelling, which must read back
    /// as the very same bits, in the direction and in every list.
    #[test]
    fn vectors_round_trip_bit_for_bit() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Finite values of every exponent and sign.
            let x = f32::from_bits((state >> 32) as u32);
            if x.is_finite() && x != 0.0 {
                x
            } else {
                1.0
            }
        };
        let mut vector = |n: usize| (0..n).map(|_| next()).collect::<Vec<f32>>();
        let vectors = EditVectors {
            direction: vector(4096),
            layer_directions: vec![vector(4096), vector(4096)],
            further_directions: vec![vector(4096)],
        };
        let f = DirectionFile::new(vectors.clone(), Map::new()).unwrap();
        let round = DirectionFile::parse(&f.to_json()).unwrap();
        let bits = |v: &EditVectors| -> Vec<u32> {
            std::iter::once(&v.direction)
                .chain(&v.layer_directions)
                .chain(&v.further_directions)
                .flatten()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(bits(&round.vectors), bits(&vectors));
    }

    #[test]
    fn recorded_edit_round_trips_and_rejects_bad_weights() {
        let f = DirectionFile::parse(
            r#"{"direction":[1,0],"scale":0.5,"skip_embeddings":true,
               "weights":{"attention":{"max_weight":1.2,"max_weight_position":3.5,"min_weight":0.1,"min_weight_distance":4},"mlp":null,"embeddings":0}}"#,
        )
        .unwrap();
        let edit = f.recorded_edit();
        assert_eq!((edit.scale(), edit.skip_embeddings), (0.5, true));
        assert_eq!(edit.weights.attention.unwrap().max_weight_position, 3.5);
        assert!(edit.weights.mlp.is_none());
        // Written back, the record is whole and reads back the same.
        let round = DirectionFile::parse(&f.to_json()).unwrap();
        assert_eq!(round.recorded_edit(), edit);
        let plain = DirectionFile::parse(r#"{"direction":[1,0]}"#).unwrap();
        assert_eq!(plain.edit, None);
        assert_eq!(plain.recorded_edit(), EditRecord::default());
        assert_eq!(
            plain.to_json(),
            "{\n  \"direction\": [\n    1.0,\n    0.0\n  ]\n}"
        );
        for bad in [
            r#"{"direction":[1],"weights":{"attention":null,"mlp":null,"embeddings":-1}}"#,
            r#"{"direction":[1],"weights":{"attention":null,"mlp":null,"embeddings":9}}"#,
            r#"{"direction":[1],"weights":"x"}"#,
            r#"{"direction":[1],"scale":2}"#,
            r#"{"direction":[1],"layer":"twelve"}"#,
        ] {
            assert!(DirectionFile::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn per_layer_directions_round_trip_and_are_checked() {
        let f = DirectionFile::parse(
            r#"{"direction":[1,0],"layer_directions":[[0,1],[1,1]],"per_layer":true}"#,
        )
        .unwrap();
        assert_eq!(
            f.vectors.layer_directions,
            vec![vec![0.0, 1.0], vec![1.0, 1.0]]
        );
        let round = DirectionFile::parse(&f.to_json()).unwrap();
        assert_eq!(round.vectors.layer_directions, f.vectors.layer_directions);
        // Global scope writes no key.
        let global = DirectionFile::parse(r#"{"direction":[1,0]}"#).unwrap();
        assert!(global.vectors.layer_directions.is_empty());
        assert!(!global.to_json().contains("layer_directions"));
        for bad in [
            r#"{"direction":[1,0],"layer_directions":[[1]]}"#,
            r#"{"direction":[1,0],"layer_directions":[[0,0]]}"#,
            r#"{"direction":[1,0],"layer_directions":[[1,"x"]]}"#,
            r#"{"direction":[1,0],"layer_directions":[1,0]}"#,
            r#"{"direction":[1,0],"layer_directions":"x"}"#,
        ] {
            assert!(DirectionFile::parse(bad).is_err(), "{bad}");
        }
        // --pick takes a front point's per-layer directions with it.
        let point = r#"{"direction_index":1.5,"position":0,"biprojected":true,"per_layer":true,"scale":1.0,
                        "weights":{"attention":null,"mlp":null,"embeddings":0.5}}"#;
        let f = DirectionFile::parse(&format!(
            r#"{{"direction":[1,0],"front":[{{"point":{point},"direction":[0,1],"layer_directions":[[1,1],[1,-1]]}}]}}"#
        ))
        .unwrap();
        let picked = f.pick(0).unwrap();
        assert_eq!(picked.vectors.direction, vec![0.0, 1.0]);
        assert_eq!(
            picked.vectors.layer_directions,
            vec![vec![1.0, 1.0], vec![1.0, -1.0]]
        );
        assert!(picked.edit.as_ref().unwrap().per_layer);
    }

    #[test]
    fn further_directions_round_trip_are_checked_and_follow_a_pick() {
        let f = DirectionFile::parse(r#"{"direction":[1,0,0],"further_directions":[[0,1,1]]}"#)
            .unwrap();
        assert_eq!(f.vectors.further_directions, vec![vec![0.0, 1.0, 1.0]]);
        assert_eq!(f.vectors.further_directions.len(), 1);
        let round = DirectionFile::parse(&f.to_json()).unwrap();
        assert_eq!(
            round.vectors.further_directions,
            f.vectors.further_directions
        );
        // One direction writes no key.
        let one = DirectionFile::parse(r#"{"direction":[1,0]}"#).unwrap();
        assert!(one.vectors.further_directions.is_empty());
        assert!(!one.to_json().contains("further_directions"));
        for (bad, says) in [
            (
                r#"{"direction":[1,0],"further_directions":[[1]]}"#,
                "further direction 1 has 1 values",
            ),
            (
                r#"{"direction":[1,0],"further_directions":[[0,0]]}"#,
                "all zeros",
            ),
            (
                r#"{"direction":[1,0],"further_directions":[[1,"x"]]}"#,
                "list of lists",
            ),
            (
                r#"{"direction":[1,0],"further_directions":[1,0]}"#,
                "list of lists",
            ),
        ] {
            let err = format!("{:#}", DirectionFile::parse(bad).err().expect(bad));
            assert!(err.contains(says), "{bad}: {err}");
        }
        let point = r#"{"direction_index":1.5,"position":0,"biprojected":false,"per_layer":false,"scale":1.0,
                        "weights":{"attention":null,"mlp":null,"embeddings":1.0}}"#;
        let f = DirectionFile::parse(&format!(
            r#"{{"direction":[1,0],"front":[{{"point":{point},"direction":[0,1]}},{{"point":{point},"direction":[0,1],"further_directions":[[1,1]]}}]}}"#
        ))
        .unwrap();
        assert!(f.pick(0).unwrap().vectors.further_directions.is_empty());
        assert_eq!(
            f.pick(1).unwrap().vectors.further_directions,
            vec![vec![1.0, 1.0]]
        );
    }
}
