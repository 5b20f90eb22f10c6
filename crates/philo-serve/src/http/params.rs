//! Checking the shared generation fields of a request and turning them into engine settings.
//!
//! The ranges here are the ones the OpenAPI schema of
//! [`GenerationParams`](super::openai::GenerationParams) declares; keep the two in step.

use philo_generate::SamplingParams;

use super::choices::MAX_CHOICES;
use super::error::ApiError;
use super::openai::{GenerationParams, MAX_STOP_CHARS, MAX_STOP_STRINGS};

/// The checked settings of one generation request.
#[derive(Debug, Clone)]
pub struct Settings {
    pub sampling: SamplingParams,
    /// `stop` strings, each non-empty and short.
    pub stop: Vec<String>,
    /// Whether to answer with server-sent events.
    pub stream: bool,
    /// Whether a stream ends with a usage chunk.
    pub include_usage: bool,
    /// How many choices to generate (`n`).
    pub n: usize,
    /// What the answer must be (`response_format`).
    pub response_format: ResponseFormat,
}

/// A request's `response_format`.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    Text,
    /// JSON: a document of the schema, or any object when there is none (`json_object`).
    Json(Option<serde_json::Value>),
}

impl ResponseFormat {
    /// Reads OpenAI's `response_format` object; the error names what is wrong with it.
    fn from_param(value: Option<&serde_json::Value>) -> Result<Self, ApiError> {
        use serde_json::Value;
        let invalid = |why: &str| ApiError::invalid_param("response_format", why.to_string());
        let Some(value) = value.filter(|v| !v.is_null()) else {
            return Ok(ResponseFormat::Text);
        };
        match value.get("type").and_then(Value::as_str) {
            Some("text") => Ok(ResponseFormat::Text),
            Some("json_object") => Ok(ResponseFormat::Json(None)),
            Some("json_schema") => {
                let spec = value.get("json_schema").filter(|v| v.is_object()).ok_or_else(|| {
                    invalid("`response_format` of type \"json_schema\" needs a `json_schema` object holding the `schema`")
                })?;
                match spec.get("schema") {
                    None | Some(Value::Null) => Ok(ResponseFormat::Json(None)),
                    Some(schema) if schema.is_object() => {
                        Ok(ResponseFormat::Json(Some(schema.clone())))
                    }
                    Some(_) => Err(invalid(
                        "`response_format.json_schema.schema` must be a JSON Schema object",
                    )),
                }
            }
            _ => Err(invalid(
                "`response_format` must have `type` \"text\", \"json_object\" or \"json_schema\"",
            )),
        }
    }
}

/// An allowed range of a number field.
struct Range {
    min: f64,
    /// Whether `min` itself is excluded.
    min_exclusive: bool,
    max: f64,
}

impl Range {
    fn check(&self, param: &str, value: f64) -> Result<f32, ApiError> {
        let above_min = if self.min_exclusive {
            value > self.min
        } else {
            value >= self.min
        };
        if above_min && value <= self.max {
            // The ranges lie well inside f32's, but a tiny value above an exclusive bound of 0
            // rounds to 0 itself; keep it above, as the client asked.
            let rounded = value as f32;
            let bound = self.min as f32;
            return Ok(if self.min_exclusive && rounded <= bound {
                bound.next_up()
            } else {
                rounded
            });
        }
        let open = if self.min_exclusive { "(" } else { "[" };
        Err(ApiError::invalid_param(
            param,
            format!(
                "`{param}` is {value} but must be in {open}{}, {}]",
                self.min, self.max
            ),
        ))
    }
}

const TEMPERATURE: Range = Range {
    min: 0.0,
    min_exclusive: false,
    max: 2.0,
};
const PROBABILITY_MASS: Range = Range {
    min: 0.0,
    min_exclusive: true,
    max: 1.0,
};
const MIN_P: Range = Range {
    min: 0.0,
    min_exclusive: false,
    max: 1.0,
};
/// Logits are divided by the penalty, so it stays far enough from 0 to keep them finite.
const REPETITION_PENALTY: Range = Range {
    min: 0.01,
    min_exclusive: false,
    max: 10.0,
};
const LOGIT_BIAS: Range = Range {
    min: -100.0,
    min_exclusive: false,
    max: 100.0,
};
const OPENAI_PENALTY: Range = Range {
    min: -2.0,
    min_exclusive: false,
    max: 2.0,
};

fn check_optional(param: &str, value: Option<f64>, range: &Range) -> Result<Option<f32>, ApiError> {
    value.map(|v| range.check(param, v)).transpose()
}

impl Settings {
    /// Checks `params`; the error names the first field out of range.
    pub fn from_params(params: &GenerationParams) -> Result<Self, ApiError> {
        let n = params.n.unwrap_or(1);
        if !(1..=MAX_CHOICES).contains(&n) {
            return Err(ApiError::invalid_param(
                "n",
                format!("`n` is {n} but must be in [1, {MAX_CHOICES}]; send several requests for more choices"),
            ));
        }
        if let Some((field, why)) = params.unsupported.first() {
            return Err(ApiError::invalid_param(
                field,
                format!("`{field}` is set, but {why}; leave it out"),
            ));
        }
        let mut logit_bias = Vec::new();
        for (key, &value) in params.logit_bias.iter().flatten() {
            let id = key.parse::<u32>().map_err(|_| {
                ApiError::invalid_param(
                    "logit_bias",
                    format!("`logit_bias` key `{key}` is not a token id (a non-negative integer)"),
                )
            })?;
            logit_bias.push((id, LOGIT_BIAS.check("logit_bias", value)?));
        }
        logit_bias.sort_by_key(|&(id, _)| id);
        if params.top_k == Some(0) {
            return Err(ApiError::invalid_param(
                "top_k",
                "`top_k` must be at least 1; leave it out to keep every token",
            ));
        }
        let sampling = SamplingParams {
            // OpenAI's defaults: plain sampling at temperature 1.
            temperature: check_optional("temperature", params.temperature, &TEMPERATURE)?
                .unwrap_or(1.0),
            top_k: params.top_k.map(|k| k as usize),
            top_p: check_optional("top_p", params.top_p, &PROBABILITY_MASS)?,
            typical_p: check_optional("typical_p", params.typical_p, &PROBABILITY_MASS)?,
            // min_p = 0 keeps every token, which is the sampler's "off".
            min_p: check_optional("min_p", params.min_p, &MIN_P)?.filter(|&p| p > 0.0),
            repetition_penalty: check_optional(
                "repetition_penalty",
                params.repetition_penalty,
                &REPETITION_PENALTY,
            )?,
            frequency_penalty: check_optional(
                "frequency_penalty",
                params.frequency_penalty,
                &OPENAI_PENALTY,
            )?
            .unwrap_or(0.0),
            presence_penalty: check_optional(
                "presence_penalty",
                params.presence_penalty,
                &OPENAI_PENALTY,
            )?
            .unwrap_or(0.0),
            // Negative seeds (OpenAI allows them) map to distinct u64 seeds.
            seed: params.seed.map(|seed| seed as u64),
            logit_bias,
            // Set by the route, whose field it is (`logprobs` differs between the two).
            logprobs: None,
        };
        // The sampler's own check, in case its rules ever get stricter than the ranges above.
        sampling.validate().map_err(|error| match &error {
            philo_generate::sampling::SamplingError::InvalidParameter { parameter, .. } => {
                ApiError::invalid_param(*parameter, error.to_string())
            }
        })?;
        let stop = params
            .stop
            .clone()
            .map(|s| s.into_vec())
            .unwrap_or_default();
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid_param(
                "stop",
                format!(
                    "`stop` has {} strings but at most {MAX_STOP_STRINGS} are allowed",
                    stop.len()
                ),
            ));
        }
        if let Some(long) = stop.iter().find(|s| s.chars().count() > MAX_STOP_CHARS) {
            return Err(ApiError::invalid_param(
                "stop",
                format!(
                    "a `stop` string is {} characters long but at most {MAX_STOP_CHARS} are allowed; shorten it",
                    long.chars().count()
                ),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param(
                "stop",
                "`stop` holds an empty string, which would end the output before it starts; remove it",
            ));
        }
        Ok(Settings {
            sampling,
            stop,
            stream: params.stream.unwrap_or(false),
            include_usage: params
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            n: n as usize,
            response_format: ResponseFormat::from_param(params.response_format.as_ref())?,
        })
    }
}

/// How many tokens to generate for a prompt of `prompt_len` tokens: `requested` (named `param`
/// in errors) if the two fit the context, all the context leaves when nothing was requested.
pub fn max_tokens(
    prompt_len: usize,
    requested: Option<u64>,
    param: &str,
    prompt_param: &str,
    context: usize,
) -> Result<usize, ApiError> {
    if prompt_len >= context {
        return Err(ApiError::context_length_exceeded(
            prompt_param,
            format!(
                "the prompt is {prompt_len} tokens but the model's context is {context} tokens, which leaves no room to generate; shorten the prompt"
            ),
        ));
    }
    let room = context - prompt_len;
    match requested {
        None => Ok(room),
        Some(0) => Err(ApiError::invalid_param(
            param,
            format!("`{param}` must be at least 1"),
        )),
        Some(n) if n > room as u64 => Err(ApiError::context_length_exceeded(
            param,
            format!(
                "the prompt ({prompt_len} tokens) plus `{param}` ({n}) exceeds the model's context of {context} tokens; ask for at most {room} tokens or shorten the prompt"
            ),
        )),
        Some(n) => Ok(n as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::openai::Stop;

    #[test]
    fn defaults_are_openai_defaults() {
        let settings = Settings::from_params(&GenerationParams::default()).unwrap();
        assert_eq!(settings.sampling.temperature, 1.0);
        assert_eq!(settings.sampling.top_p, None);
        assert!(settings.stop.is_empty());
        assert!(!settings.stream);
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        for (params, field) in [
            (
                GenerationParams {
                    temperature: Some(-1.0),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerationParams {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                GenerationParams {
                    presence_penalty: Some(2.5),
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                GenerationParams {
                    n: Some(17),
                    ..Default::default()
                },
                "n",
            ),
            (
                GenerationParams {
                    stop: Some(Stop::One(String::new())),
                    ..Default::default()
                },
                "stop",
            ),
        ] {
            let error = Settings::from_params(&params).unwrap_err().into_body();
            assert_eq!(error.error.param.as_deref(), Some(field));
        }
    }

    #[test]
    fn tiny_values_above_an_exclusive_zero_stay_above_it() {
        let params = GenerationParams {
            top_p: Some(5e-324),
            ..Default::default()
        };
        let top_p = Settings::from_params(&params).unwrap().sampling.top_p;
        assert!(top_p.unwrap() > 0.0);
    }

    #[test]
    fn min_p_zero_means_off() {
        let params = GenerationParams {
            min_p: Some(0.0),
            ..Default::default()
        };
        assert_eq!(Settings::from_params(&params).unwrap().sampling.min_p, None);
    }

    #[test]
    fn max_tokens_defaults_to_the_room_left_and_rejects_overflow() {
        assert_eq!(
            max_tokens(10, None, "max_tokens", "prompt", 4096).unwrap(),
            4086
        );
        assert_eq!(
            max_tokens(10, Some(5), "max_tokens", "prompt", 4096).unwrap(),
            5
        );
        let error = max_tokens(10, Some(4087), "max_tokens", "prompt", 4096)
            .unwrap_err()
            .into_body();
        assert_eq!(error.error.code, Some("context_length_exceeded"));
        let error = max_tokens(4096, None, "max_tokens", "prompt", 4096)
            .unwrap_err()
            .into_body();
        assert_eq!(error.error.param.as_deref(), Some("prompt"));
    }
}
