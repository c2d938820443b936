//! The edit as it is recorded: one typed record that the direction file,
//! the report, the GGUF's `abliterate.*` keys and `apply --direction`
//! all read and write.

use super::{EditPoint, EditWeights};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The recorded edit. Its numbers are f64, as the JSON and the GGUF's
/// `abliterate.*` keys hold them; `point` gives the f32 edit back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EditRecord {
    /// The direction index rounded: the layer whose direction it is nearest.
    pub layer: u64,
    /// Post-instruction position, counted from the first suffix token.
    pub position: u64,
    /// Share of the direction removed (`apply --scale`).
    pub scale: f64,
    /// `token_embd` left unedited.
    pub skip_embeddings: bool,
    pub direction_index: f64,
    pub biprojected: bool,
    pub per_layer: bool,
    pub weights: EditWeights,
}

/// The keys of a direction file that belong to the record.
pub const RECORD_KEYS: [&str; 8] = [
    "layer",
    "position",
    "scale",
    "skip_embeddings",
    "direction_index",
    "biprojected",
    "per_layer",
    "weights",
];

impl Default for EditRecord {
    /// The paper's plain edit: the whole direction, every writer.
    fn default() -> Self {
        EditRecord {
            layer: 0,
            position: 0,
            scale: 1.0,
            skip_embeddings: false,
            direction_index: 0.0,
            biprojected: false,
            per_layer: false,
            weights: EditWeights::default(),
        }
    }
}

impl EditRecord {
    pub fn of(point: &EditPoint) -> EditRecord {
        EditRecord {
            layer: point.direction_index.round() as u64,
            position: point.position as u64,
            scale: point.scale as f64,
            skip_embeddings: point.weights.embeddings == 0.0,
            direction_index: point.direction_index as f64,
            biprojected: point.biprojected,
            per_layer: point.per_layer,
            weights: point.weights,
        }
    }

    /// The share removed, as the edit uses it.
    pub fn scale(&self) -> f32 {
        self.scale as f32
    }

    /// Rejects an edit no file should hold (weights out of range, a scale
    /// outside (0, 1]).
    pub fn validate(&self) -> Result<()> {
        self.weights.validate()?;
        let scale = self.scale();
        if !(scale > 0.0 && scale <= 1.0) {
            bail!("\"scale\" must be in (0, 1], got {scale}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_keeps_the_points_numbers_and_names_every_key() {
        let point = EditPoint {
            direction_index: 16.4,
            position: 2,
            biprojected: true,
            per_layer: false,
            scale: 0.8734567,
            weights: EditWeights::uniform(false),
        };
        let record = EditRecord::of(&point);
        assert_eq!((record.layer, record.skip_embeddings), (16, true));
        assert_eq!(record.scale(), point.scale);
        assert_eq!(record.direction_index as f32, point.direction_index);
        let json = serde_json::to_value(&record).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut expected = RECORD_KEYS.to_vec();
        expected.sort();
        assert_eq!(keys, expected);
        assert!(EditRecord::default().validate().is_ok());
        let bad = EditRecord {
            scale: 1.5,
            ..record
        };
        assert!(bad.validate().is_err());
    }
}
