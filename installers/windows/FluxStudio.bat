@echo off
rem FluxStudio launcher for Windows: double-click this file.
rem Options: --share  --port N  --cpu  --update  --no-browser  --smoke-test
rem Environment: FLUXSTUDIO_TORCH_INDEX (torch wheel index, or "pypi"), FLUXSTUDIO_TORCH, FLUXSTUDIO_HOME.
setlocal
powershell -NoProfile -ExecutionPolicy Bypass -File "%~dp0fluxstudio.ps1" %*
if errorlevel 1 (
    echo.
    echo FluxStudio could not start. The log is in %LOCALAPPDATA%\FluxStudio\logs\launcher.log
    pause
    exit /b 1
)
endlocal
