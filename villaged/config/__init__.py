"""Configuration: the TOML schema (``model``) and the loader that checks and reads it (``loader``).

Everything else imports from here: ``load_config``, ``check_config_files``, ``ConfigError`` and
the section dataclasses.
"""

from villaged.config.loader import ConfigError, check_config_files, load_config, read_section
from villaged.config.model import (
    AdminConfig,
    BackupConfig,
    C2SConfig,
    Config,
    Endpoint,
    FederationConfig,
    HttpListenerConfig,
    ListenerConfig,
    ListenersConfig,
    LogConfig,
    LogLevel,
    MonitorConfig,
    PeerConfig,
    ServerConfig,
    StorageConfig,
    TlsConfig,
    TlsProfile,
    WebSocketConfig,
)

__all__ = [
    "AdminConfig",
    "BackupConfig",
    "C2SConfig",
    "Config",
    "ConfigError",
    "Endpoint",
    "FederationConfig",
    "HttpListenerConfig",
    "ListenerConfig",
    "ListenersConfig",
    "LogConfig",
    "LogLevel",
    "MonitorConfig",
    "PeerConfig",
    "ServerConfig",
    "StorageConfig",
    "TlsConfig",
    "TlsProfile",
    "WebSocketConfig",
    "check_config_files",
    "load_config",
    "read_section",
]
