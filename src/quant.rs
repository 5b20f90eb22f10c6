//! The `--quant` choice of the commands: how the base model's projections are stored.

use philo_model::WeightFormat;

/// The base weights' format as the command line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseQuant {
    /// The checkpoint's values in the compute dtype.
    #[default]
    None,
    /// Per-row INT8 (W8A16).
    Int8,
    /// INT4 in groups of 128 input columns (W4A16).
    Int4,
    /// NF4 blocks of 64 (QLoRA), bit-compatible with bitsandbytes.
    Nf4,
}

impl BaseQuant {
    /// The model's weight format; `double_quant` applies to NF4 (its block scales in 8 bits).
    pub fn format(self, double_quant: bool) -> WeightFormat {
        match self {
            BaseQuant::None => WeightFormat::Dense,
            BaseQuant::Int8 => WeightFormat::Int8,
            BaseQuant::Int4 => WeightFormat::Int4,
            BaseQuant::Nf4 => WeightFormat::Nf4 { double_quant },
        }
    }

    /// The name `--quant` takes.
    pub fn name(self) -> &'static str {
        match self {
            BaseQuant::None => "none",
            BaseQuant::Int8 => "int8",
            BaseQuant::Int4 => "int4",
            BaseQuant::Nf4 => "nf4",
        }
    }
}

impl std::str::FromStr for BaseQuant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "bf16" | "dense" => Ok(BaseQuant::None),
            "int8" => Ok(BaseQuant::Int8),
            "int4" => Ok(BaseQuant::Int4),
            "nf4" => Ok(BaseQuant::Nf4),
            _ => Err(format!(
                "unknown --quant `{s}`: use none (the checkpoint's weights), int8, int4 or nf4"
            )),
        }
    }
}
