//! The body of an OFREP evaluation request (`POST
//! /ofrep/v1/evaluate/flags[/{key}]`): the evaluation context it carries.

use serde_json::Value;

use super::Context;

/// Why an OFREP request body is not acceptable; the text is what the
/// server answers in its `errorDetails`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OfrepRequestError {
    /// The body is not JSON.
    #[error("the request body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// The body has no `context` key.
    #[error("the request body has no `context`")]
    NoContext,
    /// `context` is there but is not an object.
    #[error("`context` must be an object")]
    ContextNotObject,
    /// `context.targetingKey` is there but is not a string.
    #[error("`context.targetingKey` must be a string")]
    TargetingKeyNotString,
}

/// The evaluation context of an OFREP request body
/// (`{"context": {"targetingKey": "user-1", …}}`).
///
/// # Errors
/// [`OfrepRequestError`] naming what is wrong with the body.
pub fn ofrep_context(body: &[u8]) -> Result<Context, OfrepRequestError> {
    let v: Value = serde_json::from_slice(body).map_err(OfrepRequestError::NotJson)?;
    match v.get("context") {
        Some(Value::Object(c)) => {
            if c.get("targetingKey").is_some_and(|t| !t.is_string()) {
                return Err(OfrepRequestError::TargetingKeyNotString);
            }
            Ok(c.clone())
        }
        Some(_) => Err(OfrepRequestError::ContextNotObject),
        None => Err(OfrepRequestError::NoContext),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_object_is_returned_as_is() {
        let c = ofrep_context(br#"{"context":{"targetingKey":"u-1","plan":"pro"}}"#).unwrap();
        assert_eq!(c["targetingKey"], "u-1");
        assert_eq!(c["plan"], "pro");
    }

    #[test]
    fn each_bad_body_is_named() {
        assert!(matches!(ofrep_context(b"{"), Err(OfrepRequestError::NotJson(_))));
        assert!(matches!(ofrep_context(b"{}"), Err(OfrepRequestError::NoContext)));
        assert!(matches!(
            ofrep_context(br#"{"context":[]}"#),
            Err(OfrepRequestError::ContextNotObject)
        ));
        assert!(matches!(
            ofrep_context(br#"{"context":{"targetingKey":1}}"#),
            Err(OfrepRequestError::TargetingKeyNotString)
        ));
    }
}
