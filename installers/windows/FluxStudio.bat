@echo off
rem FluxStudio launcher for Windows: double-click this file.
rem It finds Python 3.10-3.12 and runs installers\bootstrap.py, which sets up .venv on the first start and
rem starts the app. Options are passed on: --share --port N --cpu --update --no-browser --smoke-test
setlocal
set "BOOTSTRAP=%~dp0..\bootstrap.py"
set "PY="
for %%V in (3.12 3.11 3.10) do if not defined PY (
    py -%%V -c "import sys" >nul 2>&1 && set "PY=py -%%V"
)
if not defined PY (
    python -c "import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)" >nul 2>&1 && set "PY=python"
)
if not defined PY goto nopython

%PY% "%BOOTSTRAP%" %*
if errorlevel 1 goto failed
endlocal
exit /b 0

:nopython
echo FluxStudio needs Python 3.10, 3.11 or 3.12, and none was found.
where winget >nul 2>&1
if errorlevel 1 (
    echo Install it from https://www.python.org/downloads/ and tick "Add python.exe to PATH" in the installer.
) else (
    echo Install it with:  winget install Python.Python.3.12
    echo or from https://www.python.org/downloads/ with "Add python.exe to PATH" ticked.
)
echo Then double-click FluxStudio.bat again.
pause
exit /b 1

:failed
echo.
echo FluxStudio could not start; the message above says why.
echo The log is in %LOCALAPPDATA%\FluxStudio\logs\launcher.log
pause
exit /b 1
