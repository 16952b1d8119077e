//! `component_enum!`: how each role (sources, transforms, sinks) declares its closed set of
//! component types.

/// Declares a closed enum of component configurations tagged by `type`, with its list of type
/// names and per-type JSON Schemas. Adding a component type is one line here.
#[macro_export]
macro_rules! component_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident($ty_name:literal, $cfg:ty),)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
        #[serde(tag = "type")]
        pub enum $name {
            $(#[serde(rename = $ty_name)] $variant($cfg),)*
        }

        /// The `type` names.
        pub const TYPES: &[&str] = &[$($ty_name),*];

        /// The JSON Schema of one type's configuration (without its `type` field).
        pub fn variant_schema(ty: &str) -> Option<serde_json::Value> {
            match ty {
                $($ty_name => serde_json::to_value(schemars::schema_for!($cfg)).ok(),)*
                _ => None,
            }
        }

        impl $name {
            /// The `type` name.
            pub fn kind(&self) -> &'static str {
                match self { $(Self::$variant(_) => $ty_name,)* }
            }
        }

        #[allow(unused_imports)]
        use $crate::config::Spec as _;

        // Method calls (not `Spec::check(c, ..)`) reach a boxed configuration through `Deref`,
        // so that every method is forwarded, including ones added later.
        impl $crate::config::Spec for $name {
            fn check(&self, ptr: &str, cx: &mut $crate::config::Checker<'_>) {
                match self { $(Self::$variant(c) => c.check(ptr, cx),)* }
            }
            fn inputs(&self) -> &[String] {
                match self { $(Self::$variant(c) => c.inputs(),)* }
            }
            fn ports(&self) -> Vec<$crate::runtime::Port> {
                match self { $(Self::$variant(c) => c.ports(),)* }
            }
            fn needs(&self) -> $crate::config::Needs {
                match self { $(Self::$variant(c) => c.needs(),)* }
            }
            fn forwards(&self) -> bool {
                match self { $(Self::$variant(c) => c.forwards(),)* }
            }
            fn check_partitioned(&self, ptr: &str, cx: &mut $crate::config::Checker<'_>) {
                match self { $(Self::$variant(c) => c.check_partitioned(ptr, cx),)* }
            }
            fn hands_over_partitions(&self) -> bool {
                match self { $(Self::$variant(c) => c.hands_over_partitions(),)* }
            }
            fn accepts_columns(&self) -> bool {
                match self { $(Self::$variant(c) => c.accepts_columns(),)* }
            }
            fn replay_range(&mut self) -> Option<&mut Option<$crate::config::ReplayRange>> {
                match self { $(Self::$variant(c) => c.replay_range(),)* }
            }
        }
    };
}
