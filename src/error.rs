//! The crate's error type: every error says whose fault it is and whether retrying can help.
//!
//! The split mirrors how an operator reacts: a [`Fault::User`] error needs a config or database
//! change (the message names the fix), an [`Fault::External`] error is a service that failed or
//! could not be reached (retried with backoff when [`Error::retryable`] is set), and a
//! [`Fault::Internal`] error is a bug in trusst-cdc.

use std::fmt;

/// Whose fault an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Bad configuration, schema or privileges: the operator must change something.
    User,
    /// A service (PostgreSQL, Kafka, a CRM) failed or is unreachable.
    External,
    /// A bug or broken invariant inside trusst-cdc.
    Internal,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::User => "configuration error",
            Fault::External => "external service error",
            Fault::Internal => "internal error",
        })
    }
}

/// An error with its fault domain, a retry hint and, for user errors, the fix.
#[derive(Debug)]
pub struct Error {
    /// Whose fault it is.
    pub fault: Fault,
    /// True when the same operation may succeed later (timeouts, 5xx, a restarting broker).
    pub retryable: bool,
    /// How long the service asked us to wait before retrying (Retry-After, a rate-limit reset).
    pub retry_after: Option<std::time::Duration>,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A problem the operator must fix; `message` should say what is wrong and how to fix it.
    pub fn user(message: impl Into<String>) -> Self {
        Self {
            fault: Fault::User,
            retryable: false,
            retry_after: None,
            message: message.into(),
            source: None,
        }
    }

    /// A failing or unreachable service; retryable by default.
    pub fn external(message: impl Into<String>) -> Self {
        Self {
            fault: Fault::External,
            retryable: true,
            retry_after: None,
            message: message.into(),
            source: None,
        }
    }

    /// A bug in trusst-cdc.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            fault: Fault::Internal,
            retryable: false,
            retry_after: None,
            message: message.into(),
            source: None,
        }
    }

    /// Attach the underlying cause (shown after the message).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Override the retry hint.
    pub fn retry(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Ask the caller to wait this long before retrying (implies retryable).
    pub fn after(mut self, wait: std::time::Duration) -> Self {
        self.retryable = true;
        self.retry_after = Some(wait);
        self
    }

    /// The message without the cause chain.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.fault, self.message)?;
        let mut cause = self
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// Map a tokio-postgres error: server errors about privileges or missing objects are the
/// operator's to fix, connection problems are external and retryable.
pub fn pg(context: impl Into<String>, e: tokio_postgres::Error) -> Error {
    use tokio_postgres::error::SqlState;
    let context = context.into();
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let user_fault = [
            SqlState::INSUFFICIENT_PRIVILEGE,
            SqlState::UNDEFINED_TABLE,
            SqlState::UNDEFINED_COLUMN,
            SqlState::INVALID_PASSWORD,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            SqlState::UNDEFINED_OBJECT,
            SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
            // A query that cannot run on this schema (an operator or a type that does not
            // fit): retrying will not change the schema.
            SqlState::UNDEFINED_FUNCTION,
            SqlState::DATATYPE_MISMATCH,
        ]
        .contains(code);
        let msg = format!("{context}: {} (SQLSTATE {})", db.message(), code.code());
        return if user_fault {
            Error::user(msg)
        } else {
            Error::external(msg)
        };
    }
    Error::external(context).with_source(e)
}

/// Map a Kafka client error; everything but configuration problems is retryable.
pub fn kafka(context: impl Into<String>, e: rdkafka::error::KafkaError) -> Error {
    use rdkafka::error::KafkaError;
    match e {
        KafkaError::ClientConfig(..) => Error::user(format!(
            "{}: {e}; check the [kafka] section and the librdkafka property names",
            context.into()
        )),
        other => Error::external(context).with_source(other),
    }
}

/// Exponential backoff with jitter between `min` and `max`, never giving up: what every retry
/// loop here uses (the caller decides when to stop).
pub fn backoff(min: std::time::Duration, max: std::time::Duration) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}
