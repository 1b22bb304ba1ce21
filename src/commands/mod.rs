//! One module per subcommand.
pub mod chat;
pub mod convert;
pub mod inspect;
pub mod options;
pub mod run;
