# FluxStudio launcher for Windows (called by FluxStudio.bat). Same behaviour as installers/linux/fluxstudio.sh:
# find Python 3.10-3.12, make .venv in the app folder, install PyTorch (CUDA build when an NVIDIA GPU is present,
# else CPU) and requirements.txt, skip that on later starts unless requirements changed, then start app.py.
$ErrorActionPreference = "Stop"
$AppDir = (Resolve-Path (Join-Path $PSScriptRoot "..\..")).Path
$DataDir = if ($env:FLUXSTUDIO_HOME) { $env:FLUXSTUDIO_HOME } else { Join-Path $env:LOCALAPPDATA "FluxStudio" }
$LogDir = Join-Path $DataDir "logs"
$Log = Join-Path $LogDir "launcher.log"
$Venv = Join-Path $AppDir ".venv"
$Requirements = Join-Path $AppDir "requirements.txt"
$App = Join-Path $AppDir "app.py"

$Port = 7860; $Share = $false; $Cpu = $false; $Update = $false; $Browser = $true; $Smoke = $false
for ($i = 0; $i -lt $args.Count; $i++) {
    switch ($args[$i]) {
        "--share" { $Share = $true }
        "--port" { $i++; $Port = [int]$args[$i] }
        "--cpu" { $Cpu = $true }
        "--update" { $Update = $true }
        "--no-browser" { $Browser = $false }
        "--smoke-test" { $Smoke = $true; $Browser = $false }
        default { Write-Host "Unknown option: $($args[$i])"; exit 2 }
    }
}

New-Item -ItemType Directory -Force -Path $LogDir | Out-Null
Add-Content $Log "=== $(Get-Date -Format s) FluxStudio launcher ==="

function Fail($message) {
    Write-Host ""
    Write-Host "FluxStudio could not start: $message" -ForegroundColor Red
    Write-Host "The full log is in: $Log"
    exit 1
}

function Find-Python {
    foreach ($v in "3.12", "3.11", "3.10") {
        try { $exe = & py "-$v" -c "import sys; print(sys.executable)" 2>$null; if ($LASTEXITCODE -eq 0 -and $exe) { return $exe } } catch {}
    }
    foreach ($name in "python", "python3") {
        try {
            & $name -c "import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)" 2>$null
            if ($LASTEXITCODE -eq 0) { return (& $name -c "import sys; print(sys.executable)") }
        } catch {}
    }
    return $null
}

$Py = Join-Path $Venv "Scripts\python.exe"
$venvOk = $false
if (Test-Path $Py) { & $Py -c "import sys" 2>$null; $venvOk = ($LASTEXITCODE -eq 0) }
if (-not $venvOk) {
    $python = Find-Python
    if (-not $python) { Fail "FluxStudio needs Python 3.10, 3.11 or 3.12: install it from https://www.python.org/downloads/ (tick 'Add python.exe to PATH'), then start FluxStudio again." }
    Write-Host "Setting up FluxStudio in $Venv (first start only)..."
    if (Test-Path $Venv) { Remove-Item -Recurse -Force $Venv }
    & $python -m venv $Venv *>> $Log
    if ($LASTEXITCODE -ne 0) { Fail "could not create a virtual environment." }
}

if ($env:FLUXSTUDIO_TORCH_INDEX) { $Index = $env:FLUXSTUDIO_TORCH_INDEX }
elseif (-not $Cpu -and (Get-Command nvidia-smi -ErrorAction SilentlyContinue)) { $Index = "https://download.pytorch.org/whl/cu128" }
else { $Index = "https://download.pytorch.org/whl/cpu" }
$Torch = if ($env:FLUXSTUDIO_TORCH) { $env:FLUXSTUDIO_TORCH } else { "torch" }
$Stamp = Join-Path $Venv ".fluxstudio-stamp"
$hasher = [System.Security.Cryptography.SHA256]::Create()
$bytes = [System.Text.Encoding]::UTF8.GetBytes((Get-Content -Raw $Requirements) + "`n$Torch $Index")
$Want = -join ($hasher.ComputeHash($bytes) | ForEach-Object { $_.ToString("x2") })
$Have = if (Test-Path $Stamp) { (Get-Content -Raw $Stamp).Trim() } else { "" }

if ($Update -or $Have -ne $Want) {
    Write-Host "Installing PyTorch ($Torch from $Index) and FluxStudio's requirements; the first time this downloads about 3 GB with CUDA. See $Log"
    if (Test-Path $Stamp) { Remove-Item $Stamp }
    if ($Index -ne "pypi") {
        & $Py -m pip install --disable-pip-version-check --timeout 30 --retries 1 --index-url $Index $Torch *>> $Log
        if ($LASTEXITCODE -ne 0 -and $env:FLUXSTUDIO_TORCH_INDEX) { Fail "installing PyTorch from $Index failed. Start FluxStudio again to retry." }
        if ($LASTEXITCODE -ne 0) { Write-Host "PyTorch's own index could not be used; installing PyTorch from PyPI instead." }
    }
    if ($Index -eq "pypi" -or $LASTEXITCODE -ne 0) {
        & $Py -m pip install --disable-pip-version-check $Torch *>> $Log
        if ($LASTEXITCODE -ne 0) { Fail "installing PyTorch failed (network?). Start FluxStudio again to retry." }
    }
    & $Py -m pip install --disable-pip-version-check -r $Requirements *>> $Log
    if ($LASTEXITCODE -ne 0) { Fail "installing the requirements failed (network?). Start FluxStudio again to retry." }
    Set-Content -Path $Stamp -Value $Want
    Write-Host "Installed."
} else {
    Write-Host "FluxStudio is up to date (requirements unchanged): skipping installation."
}

$appArgs = @($App, "--port", "$Port")
if ($Share) { $appArgs += "--share" }
if ($Browser) { $appArgs += "--inbrowser" }

if ($Smoke) {
    $proc = Start-Process -FilePath $Py -ArgumentList $appArgs -PassThru -NoNewWindow -RedirectStandardOutput (Join-Path $LogDir "app-smoke.log")
    for ($t = 0; $t -lt 180; $t++) {
        try { if ((Invoke-WebRequest -UseBasicParsing "http://127.0.0.1:$Port/" -TimeoutSec 2).StatusCode -eq 200) { Stop-Process $proc; exit 0 } } catch {}
        if ($proc.HasExited) { Fail "the app exited during start-up." }
        Start-Sleep 1
    }
    Stop-Process $proc
    Fail "the app did not answer on port $Port within 3 minutes."
}

Write-Host "Starting FluxStudio on http://127.0.0.1:$Port/ (close this window to stop it)."
& $Py @appArgs 2>&1 | Tee-Object -FilePath $Log -Append
if ($LASTEXITCODE -ne 0) { Fail "the app stopped with an error." }
